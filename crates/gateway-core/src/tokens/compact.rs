//! A compact copy of a tiktoken encoding, for counting only.
//!
//! tiktoken-rs keeps each encoding as hash maps of one heap allocation per token, both ways (bytes to
//! rank, rank to bytes), a sorted copy, and 256 clones of its regexes: about 40 MB resident for
//! `o200k_base` and 20 MB for `cl100k_base`, most of a gateway's idle memory. Counting needs only
//! bytes to rank. [`CompactBpe`] holds every token's bytes in one buffer, their offsets, and an
//! open-addressing table of ranks: about 5 MB for `o200k_base`. It is built once from tiktoken's
//! tables, which are then freed, and counts exactly as tiktoken's `encode_ordinary` does: the same
//! split pattern, and tiktoken's own merge algorithms (MIT licence, OpenAI), the quadratic one for
//! short pieces and the heap-based one for pieces of 100 bytes and more.

use std::collections::BinaryHeap;

use fancy_regex::Regex;
use tiktoken_rs::{CoreBPE, Rank};

/// Table slots per token, at least: keeps probe sequences short.
const LOAD: usize = 2;
/// Marks an empty slot.
const EMPTY: u32 = u32::MAX;

/// One encoding's ranks and split pattern. `Send + Sync`; share it.
pub(crate) struct CompactBpe {
    /// Every token's bytes, in rank order.
    bytes: Vec<u8>,
    /// `offsets[rank]..offsets[rank + 1]` are the bytes of `rank` (empty for an unused rank).
    offsets: Vec<u32>,
    /// Open addressing, linear probing: a rank, or [`EMPTY`].
    table: Vec<u32>,
    pattern: Regex,
}

/// The buffers of a [`CompactBpe`], allocated before tiktoken's tables are loaded.
///
/// Ordered so that the ~40 MB tiktoken allocates for a moment go back to the OS with glibc's malloc:
/// everything kept is allocated first (while the buffers are still large enough to be mapped apart
/// from the heap), so that once tiktoken's tables are freed, the free space sits at the top of the
/// heap, where a trim returns it. Loading several encodings, reserve them all before copying any
/// (measured in docs/benchmarks.md, "Memory").
pub(crate) struct Reserved {
    ranks: Rank,
    bytes: Vec<u8>,
    offsets: Vec<u32>,
    table: Vec<u32>,
    pattern: Regex,
}

impl Reserved {
    /// Buffers for `ranks` tokens of about `bytes_hint` bytes in all, and the compiled `pattern`.
    pub(crate) fn new(ranks: Rank, bytes_hint: usize, pattern: &str) -> Option<Self> {
        Some(Self {
            ranks,
            pattern: Regex::new(pattern).ok()?,
            bytes: Vec::with_capacity(bytes_hint),
            offsets: Vec::with_capacity(ranks as usize + 1),
            table: vec![EMPTY; (ranks as usize * LOAD).next_power_of_two()],
        })
    }

    /// Loads tiktoken's tables with `load`, copies the tokens, and frees the tables.
    pub(crate) fn copy(&mut self, load: impl FnOnce() -> Option<CoreBPE>) -> Option<()> {
        let bpe = load()?;
        for rank in 0..self.ranks {
            self.offsets.push(u32::try_from(self.bytes.len()).ok()?);
            if let Ok(token) = bpe.decode_bytes(&[rank]) {
                self.bytes.extend_from_slice(&token);
            }
        }
        self.offsets.push(u32::try_from(self.bytes.len()).ok()?);
        Some(())
    }

    /// Indexes the copied tokens.
    pub(crate) fn finish(self) -> CompactBpe {
        let slots = self.table.len();
        let mut compact = CompactBpe {
            bytes: self.bytes,
            offsets: self.offsets,
            table: self.table,
            pattern: self.pattern,
        };
        for rank in 0..self.ranks {
            let token = compact.token(rank);
            if token.is_empty() {
                continue;
            }
            let mut slot = compact.slot_of(token);
            while compact.table[slot] != EMPTY {
                slot = (slot + 1) & (slots - 1);
            }
            compact.table[slot] = rank;
        }
        compact
    }
}

impl CompactBpe {
    /// Loads tiktoken's tables with `load`, copies their regular (not special) tokens, whose ranks
    /// are `0..ranks` and whose bytes add up to `bytes_hint` or so, then frees them; compiles
    /// `pattern`, tiktoken's split pattern for that encoding. [`Reserved`] does the same for several
    /// encodings at once.
    pub(crate) fn load(
        load: impl FnOnce() -> Option<CoreBPE>,
        ranks: Rank,
        bytes_hint: usize,
        pattern: &str,
    ) -> Option<Self> {
        let mut reserved = Reserved::new(ranks, bytes_hint, pattern)?;
        reserved.copy(load)?;
        release_freed_heap();
        Some(reserved.finish())
    }

    /// Tokens in `text`, as `CoreBPE::encode_ordinary(text).len()`.
    pub(crate) fn count(&self, text: &str) -> usize {
        let mut tokens = 0;
        for piece in self.pattern.find_iter(text) {
            // The pattern has no construct that can fail at match time (no backtracking limit is
            // reached by these patterns); a failure would only under-count this piece.
            let Ok(piece) = piece else { continue };
            let piece = piece.as_str().as_bytes();
            tokens += if self.rank(piece).is_some() || piece.len() == 1 {
                1
            } else if piece.len() < 100 {
                self.merge(piece).len() - 1
            } else {
                self.merge_large(piece)
            };
        }
        tokens
    }

    fn token(&self, rank: Rank) -> &[u8] {
        let i = rank as usize;
        &self.bytes[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }

    fn slot_of(&self, bytes: &[u8]) -> usize {
        // FNV-1a: tokens are short, and this needs no seed, so tables are the same in every process.
        let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        (hash as usize) & (self.table.len() - 1)
    }

    fn rank(&self, bytes: &[u8]) -> Option<Rank> {
        let mask = self.table.len() - 1;
        let mut slot = self.slot_of(bytes);
        loop {
            let rank = self.table[slot];
            if rank == EMPTY {
                return None;
            }
            if self.token(rank) == bytes {
                return Some(rank);
            }
            slot = (slot + 1) & mask;
        }
    }

    fn rank_or_max(&self, bytes: &[u8]) -> Rank {
        self.rank(bytes).unwrap_or(Rank::MAX)
    }

    /// tiktoken's `_byte_pair_merge`: the boundaries of `piece`'s tokens, start and end included.
    fn merge(&self, piece: &[u8]) -> Vec<(usize, Rank)> {
        let mut parts = Vec::with_capacity(piece.len() + 1);
        let mut min_rank: (Rank, usize) = (Rank::MAX, usize::MAX);
        for i in 0..piece.len() - 1 {
            let rank = self.rank_or_max(&piece[i..i + 2]);
            if rank < min_rank.0 {
                min_rank = (rank, i);
            }
            parts.push((i, rank));
        }
        parts.push((piece.len() - 1, Rank::MAX));
        parts.push((piece.len(), Rank::MAX));

        let get_rank = |parts: &Vec<(usize, Rank)>, i: usize| {
            if (i + 3) < parts.len() {
                self.rank_or_max(&piece[parts[i].0..parts[i + 3].0])
            } else {
                Rank::MAX
            }
        };
        while min_rank.0 != Rank::MAX {
            let i = min_rank.1;
            if i > 0 {
                parts[i - 1].1 = get_rank(&parts, i - 1);
            }
            parts[i].1 = get_rank(&parts, i);
            parts.remove(i + 1);

            min_rank = (Rank::MAX, usize::MAX);
            for (i, &(_, rank)) in parts[..parts.len() - 1].iter().enumerate() {
                if rank < min_rank.0 {
                    min_rank = (rank, i);
                }
            }
        }
        parts
    }

    /// tiktoken's `_byte_pair_merge_large` (O(n log n), for long pieces), counting the tokens.
    fn merge_large(&self, piece: &[u8]) -> usize {
        let mut state = Vec::with_capacity(piece.len());
        state.push(State {
            prev: usize::MAX,
            end: 1,
            next_end: 2,
            next_rank: Rank::MAX,
        });
        let mut heap = BinaryHeap::with_capacity(piece.len());
        for i in 0..piece.len() - 1 {
            if let Some(rank) = self.rank(&piece[i..i + 2]) {
                heap.push(Merge { start: i, rank });
                state[i].next_rank = rank;
            }
            state.push(State {
                prev: i,
                end: i + 2,
                next_end: i + 3,
                next_rank: Rank::MAX,
            });
        }
        let potential_merge = |state: &mut Vec<State>,
                               heap: &mut BinaryHeap<Merge>,
                               start: usize,
                               next_end: usize| {
            state[start].next_end = next_end;
            state[start].next_rank = Rank::MAX;
            if next_end <= piece.len()
                && let Some(rank) = self.rank(&piece[start..next_end])
            {
                heap.push(Merge { start, rank });
                state[start].next_rank = rank;
            }
        };
        while let Some(left) = heap.pop() {
            if left.rank == Rank::MAX {
                break;
            }
            if left.rank != state[left.start].next_rank {
                continue;
            }
            let left_start = left.start;
            let right_start = state[left_start].end;
            let right_end = state[left_start].next_end;
            let right_next_end = state[right_start].next_end;
            state[left_start].end = right_end;
            potential_merge(&mut state, &mut heap, left_start, right_next_end);
            if right_end < state.len() {
                state[right_end].prev = left_start;
            }
            if left_start > 0 {
                let prev_start = state[left_start].prev;
                potential_merge(&mut state, &mut heap, prev_start, right_end);
            }
            state[right_start].next_rank = Rank::MAX;
        }
        let mut tokens = 0;
        let mut i = 0;
        while i < state.len() {
            tokens += 1;
            i = state[i].end;
        }
        tokens
    }
}

/// Nudges the allocator into returning what was just freed. glibc's malloc consolidates its small
/// free chunks and trims the top of the heap when a chunk of 64 KiB or more is freed; the tens of
/// thousands of small ones tiktoken's tables were made of do not trigger that on their own. Any other
/// allocator just reuses the block.
pub(crate) fn release_freed_heap() {
    let block: Vec<u8> = Vec::with_capacity(1 << 20);
    drop(std::hint::black_box(block));
}

#[derive(Eq, PartialEq, Clone, Copy)]
struct Merge {
    start: usize,
    rank: Rank,
}

impl Ord for Merge {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.start.cmp(&self.start))
    }
}

impl PartialOrd for Merge {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

struct State {
    prev: usize,
    end: usize,
    next_end: usize,
    next_rank: Rank,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Texts where tokenisers differ if anything is off: long pieces (the heap path), non-Latin
    /// scripts, digits, contractions, runs of spaces and newlines, emoji, invalid-looking JSON.
    fn corpus() -> Vec<String> {
        let mut texts: Vec<String> = [
            "",
            "Hello, world!",
            "I'm sure they'll've done it; isn't it?  Don't.",
            "   leading and trailing spaces   ",
            "line one\nline two\r\n\r\n\n  indented\n\ttabbed",
            "1234567890 3.14159 1,000,000 0x1F 2025-06-01T12:00:00Z",
            "Ünïcödé façade naïve coöperate — “quotes” ‘single’ …",
            "日本語のテキストです。中文文本。한국어 텍스트.",
            "Здравствуйте, мир! Γειά σου Κόσμε! مرحبا بالعالم שלום עולם",
            "emoji 🚀🔥👍🏽 👨‍👩‍👧‍👦 and symbols ∑∫√∞ ≠ ≤ ≥",
            "{\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"max_tokens\":50}",
            "fn main() { println!(\"{}\", x.iter().map(|v| v * 2).sum::<u64>()); }",
            "https://example.com/path?query=1&other=two#fragment",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        texts.push("a".repeat(5_000));
        texts.push("ab".repeat(700));
        texts.push(" ".repeat(300));
        texts.push("Lorem ipsum dolor sit amet, ".repeat(200));
        texts.push("x".repeat(99));
        texts.push("x".repeat(100));
        texts.push("😀".repeat(150));
        texts.push("antidisestablishmentarianism".repeat(10));
        texts.push(
            (0..2_000)
                .map(|i| char::from(b'!' + (i * 7 % 90) as u8))
                .collect(),
        );
        texts
    }

    #[test]
    fn counts_exactly_as_tiktoken_o200k() {
        let bpe = tiktoken_rs::o200k_base().unwrap();
        let compact = CompactBpe::load(
            || tiktoken_rs::o200k_base().ok(),
            super::super::encoding::O200K_RANKS,
            super::super::encoding::O200K_BYTES,
            tiktoken_rs::O200K_BASE_PAT_STR,
        )
        .unwrap();
        assert_eq!(compact.bytes.len(), super::super::encoding::O200K_BYTES);
        for text in corpus() {
            assert_eq!(
                compact.count(&text),
                bpe.encode_ordinary(&text).len(),
                "{:?}",
                text.chars().take(60).collect::<String>()
            );
        }
    }

    #[test]
    fn counts_exactly_as_tiktoken_cl100k() {
        let bpe = tiktoken_rs::cl100k_base().unwrap();
        let compact = CompactBpe::load(
            || tiktoken_rs::cl100k_base().ok(),
            super::super::encoding::CL100K_RANKS,
            super::super::encoding::CL100K_BYTES,
            super::super::encoding::CL100K_PATTERN,
        )
        .unwrap();
        assert_eq!(compact.bytes.len(), super::super::encoding::CL100K_BYTES);
        for text in corpus() {
            assert_eq!(
                compact.count(&text),
                bpe.encode_ordinary(&text).len(),
                "{:?}",
                text.chars().take(60).collect::<String>()
            );
        }
    }
}
