//! A compact copy of a tiktoken encoding, for counting only.
//!
//! tiktoken-rs keeps each encoding as hash maps of one heap allocation per token, both ways (bytes to
//! rank, rank to bytes), a sorted copy, and 256 clones of its regexes: about 40 MB resident for
//! `o200k_base` and 20 MB for `cl100k_base`, most of a gateway's idle memory. Counting needs only
//! bytes to rank. [`CompactBpe`] holds every token's bytes in one buffer, their offsets, and an
//! open-addressing table of ranks: about 5 MB for `o200k_base`. It is built once from tiktoken's
//! tables, which are then freed, and counts exactly as tiktoken's `encode_ordinary` does: the same
//! pieces (split by [`Splitter`], tiktoken's pattern without its look-ahead), and tiktoken's own merge
//! algorithms (MIT licence, OpenAI), the quadratic one for short pieces and the heap-based one for
//! pieces of 100 bytes and more.

use std::collections::BinaryHeap;

use regex::Regex;
use regex_automata::hybrid::dfa::{Cache, DFA};
use regex_automata::util::pool::{Pool, PoolGuard};
use regex_automata::{Anchored, Input};
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
    splitter: Splitter,
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
    splitter: Splitter,
}

impl Reserved {
    /// Buffers for `ranks` tokens of about `bytes_hint` bytes in all, and the compiled `split`
    /// pattern (see [`Splitter::new`]).
    pub(crate) fn new(ranks: Rank, bytes_hint: usize, split: &str) -> Option<Self> {
        Some(Self {
            ranks,
            splitter: Splitter::new(split)?,
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
            splitter: self.splitter,
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
    /// `split`, tiktoken's split pattern for that encoding without its look-ahead (see
    /// [`Splitter`]). [`Reserved`] does the same for several encodings at once.
    pub(crate) fn load(
        load: impl FnOnce() -> Option<CoreBPE>,
        ranks: Rank,
        bytes_hint: usize,
        split: &str,
    ) -> Option<Self> {
        let mut reserved = Reserved::new(ranks, bytes_hint, split)?;
        reserved.copy(load)?;
        release_freed_heap();
        Some(reserved.finish())
    }

    /// Tokens in `text`, as `CoreBPE::encode_ordinary(text).len()`.
    pub(crate) fn count(&self, text: &str) -> usize {
        let mut tokens = 0;
        for piece in self.splitter.pieces(text) {
            let piece = piece.as_bytes();
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
        (hash(bytes) as usize) & (self.table.len() - 1)
    }

    fn rank(&self, bytes: &[u8]) -> Option<Rank> {
        let mask = self.table.len() - 1;
        let mut slot = self.slot_of(bytes);
        loop {
            let rank = self.table[slot];
            if rank == EMPTY {
                return None;
            }
            if same_bytes(self.token(rank), bytes) {
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

/// tiktoken's split of a text into pieces, without a backtracking engine: the `regex` crate's lazy
/// DFA (from regex-automata, the engine under `regex`), and for ASCII text in `o200k_base` a walk over
/// byte classes ([`o200k_ascii`]).
///
/// tiktoken's patterns end with `\s+(?!\S)|\s+` (`o200k_base`) or `\s+(?!\S)|\s` (`cl100k_base`):
/// a run of spaces before a word stops one char short, so that its last space starts the word's
/// piece (" world"). That one look-ahead makes fancy_regex run its backtracking VM over the whole
/// pattern, most of the time a count took. The split patterns given to [`Splitter::new`]
/// (`encoding::O200K_SPLIT`, `encoding::CL100K_SPLIT`) have a plain `\s+` there instead, and
/// [`Splitter::searched_piece`] gives that char back. The DFA's searches are leftmost-first (its
/// default, and `regex`'s), the semantics of a backtracking engine: at the leftmost position where the pattern matches, the first alternative
/// that matches wins, and each quantifier takes as much as it can while the rest still matches.
///
/// Why giving back is exact. Say the original pattern reaches `\s+(?!\S)` at position p: every
/// earlier alternative failed there, so p starts a maximal whitespace run p..q with no `\r` or `\n`
/// in it (else `\s*[\r\n]+`, or `\s*[\r\n]`, matched) and, for `cl100k_base`, not at the end of the
/// text (else `\s++$` matched). `\s+` takes p..q, and then:
/// - if q is the end of the text, `(?!\S)` holds: the match is p..q;
/// - otherwise the char at q is not whitespace, `(?!\S)` fails, and the engine backtracks one char:
///   at q-1 (whitespace) it holds if p..q-1 is not empty, so with a run of 2 chars or more the match
///   is p..q-1; with 1 char `\s+(?!\S)` fails and the next alternative (`\s+` or `\s`) takes p..q.
///
/// The plain pattern fails the same earlier alternatives at p and matches p..q with `\s+`. So its
/// matches are the original's, except one from `\s+` of 2 chars or more that ends before the text
/// does: that one is a char too long, and the search after it must start at that char, as the
/// original's does. A match comes from `\s+` if and only if its last char is whitespace other than
/// `\r` and `\n`: every other alternative ends with a letter, a mark, a digit, a contraction's
/// letter, a char that is not whitespace, or `[\r\n/]`, except `\s+$` (`cl100k_base`), which ends at
/// the end of the text, where nothing is given back. `char::is_whitespace` is the same Unicode
/// `White_Space` property as `\s` (a test checks every char).
pub(crate) struct Splitter {
    /// The pattern's lazy DFA, searched anchored: every char starts a piece (it is a letter, a
    /// digit, whitespace, or none of these, and each class starts an alternative), so the piece
    /// after one starts where that one ends, and only its end is to be found. The DFA finds it in
    /// one forward scan, where an unanchored search scans forward and then back.
    dfa: DFA,
    /// The DFA's caches of built states, one per thread at a time.
    caches: Pool<Cache, CacheFn>,
    /// The same pattern, searched unanchored where the DFA finds no piece (which the paragraph
    /// above rules out) or gives up (which it does not, configured as it is): the split stays exact
    /// even then.
    regex: Regex,
    /// The pattern is `encoding::O200K_SPLIT`, whose pieces of ASCII text [`o200k_ascii`] finds.
    o200k: bool,
}

/// Makes a [`Cache`] for the [`Splitter`]'s DFA.
type CacheFn = Box<dyn Fn() -> Cache + Send + Sync>;

impl Splitter {
    /// Compiles a split pattern written for it (see [`Splitter`]); `None` if it does not compile.
    pub(crate) fn new(split: &str) -> Option<Self> {
        let dfa = DFA::new(split).ok()?;
        let for_caches = dfa.clone();
        Some(Self {
            dfa,
            caches: Pool::new(Box::new(move || for_caches.create_cache())),
            regex: Regex::new(split).ok()?,
            o200k: split == super::encoding::O200K_SPLIT,
        })
    }

    /// The pieces of `text`, in order: they cover it, end to end.
    pub(crate) fn pieces<'s, 't>(&'s self, text: &'t str) -> Pieces<'s, 't> {
        Pieces {
            splitter: self,
            cache: self.caches.get(),
            text,
            at: 0,
        }
    }

    /// The piece that starts at `at` (a char boundary before the end of `text`): its end.
    fn piece(&self, cache: &mut Cache, text: &str, at: usize) -> Option<(usize, usize)> {
        if self.o200k
            && let Some(end) = o200k_ascii(text.as_bytes(), at)
        {
            return Some((at, end));
        }
        self.searched_piece(cache, text, at)
    }

    /// [`Splitter::piece`], searched for.
    fn searched_piece(&self, cache: &mut Cache, text: &str, at: usize) -> Option<(usize, usize)> {
        let (start, mut end) = self.find(cache, text, at)?;
        if end < text.len()
            && let Some(last) = text[start..end].chars().next_back()
            && last.is_whitespace()
            && last != '\r'
            && last != '\n'
            && end - start > last.len_utf8()
        {
            end -= last.len_utf8();
        }
        Some((start, end))
    }

    /// The first match of the split pattern at or after `at`, as the `regex` crate finds it.
    fn find(&self, cache: &mut Cache, text: &str, at: usize) -> Option<(usize, usize)> {
        let input = Input::new(text)
            .span(at..text.len())
            .anchored(Anchored::Yes);
        if let Ok(Some(end)) = self.dfa.try_search_fwd(cache, &input) {
            return Some((at, end.offset()));
        }
        let found = self.regex.find_at(text, at)?;
        Some((found.start(), found.end()))
    }
}

/// The pieces of a text, from [`Splitter::pieces`].
pub(crate) struct Pieces<'s, 't> {
    splitter: &'s Splitter,
    cache: PoolGuard<'s, Cache, CacheFn>,
    text: &'t str,
    /// Where the next search starts.
    at: usize,
}

impl<'t> Iterator for Pieces<'_, 't> {
    type Item = &'t str;

    fn next(&mut self) -> Option<&'t str> {
        let text = self.text;
        loop {
            if self.at >= text.len() {
                return None;
            }
            let (start, end) = self.splitter.piece(&mut self.cache, text, self.at)?;
            if end > start {
                self.at = end;
                return Some(&text[start..end]);
            }
            // The split patterns match no empty string; were one found, stepping over a char ends
            // the iteration all the same.
            self.at = start + text[start..].chars().next().map_or(1, char::len_utf8);
        }
    }
}

/// Classes of bytes for [`o200k_ascii`]: what `o200k_base`'s pattern tells apart among ASCII chars.
mod class {
    /// Not ASCII: a byte of a longer char.
    pub(super) const OTHER_CHAR: u8 = 0;
    /// `A-Z`: `\p{Lu}`.
    pub(super) const UPPER: u8 = 1;
    /// `a-z`: `\p{Ll}`.
    pub(super) const LOWER: u8 = 2;
    /// `0-9`: `\p{N}`.
    pub(super) const DIGIT: u8 = 3;
    /// `\r`, `\n`.
    pub(super) const NEWLINE: u8 = 4;
    /// The rest of `\s`: ` `, `\t`, `\v` (0x0B), `\f` (0x0C).
    pub(super) const SPACE: u8 = 5;
    /// Everything else (punctuation, symbols, control chars): `[^\s\p{L}\p{N}]`.
    pub(super) const PUNCT: u8 = 6;
    /// Past the end of the text.
    pub(super) const END: u8 = 7;
}

/// The [`class`] of every byte.
static CLASSES: [u8; 256] = {
    let mut classes = [class::OTHER_CHAR; 256];
    let mut b = 0;
    while b < 128 {
        classes[b] = match b as u8 {
            b'A'..=b'Z' => class::UPPER,
            b'a'..=b'z' => class::LOWER,
            b'0'..=b'9' => class::DIGIT,
            b'\r' | b'\n' => class::NEWLINE,
            b' ' | b'\t' | 0x0b | 0x0c => class::SPACE,
            _ => class::PUNCT,
        };
        b += 1;
    }
    classes
};

/// The end of the piece of `text` that starts at `at`, as [`Splitter`] with
/// `encoding::O200K_SPLIT` would find it, when every byte that decides it is ASCII; `None` otherwise
/// (the splitter then searches its DFA). Most text sent to a gateway is ASCII, and this costs a
/// table look-up per byte where a DFA's transitions are a chain of dependent loads.
///
/// The pattern's alternatives, tried in order (leftmost-first), read on ASCII:
/// 1. and 2. `[^\r\n\p{L}\p{N}]?` (a space, tab or punctuation, taken only if letters follow),
///    upper-case letters, lower-case ones (at least one letter), and a contraction if one follows.
///    With ASCII letters the `*`/`+` never give anything back: no letter is both upper- and
///    lower-case, as the `\p{Lm}`, `\p{Lo}` and `\p{M}` of both classes are.
/// 3. `\p{N}{1,3}`: up to 3 digits.
/// 4. ` ?[^\s\p{L}\p{N}]+[\r\n/]*`: an optional space, punctuation, then `\r`, `\n` and `/`.
/// 5. `\s*[\r\n]+`: whitespace up to the last `\r` or `\n` of its run, if it has one.
/// 6. `\s+`: the run, a char short if it has 2 or more and text follows (see [`Splitter`]).
///
/// Every run stops at a byte that must be ASCII (or the end): a longer char there might be a letter,
/// a mark, a digit or whitespace that the run would take; that returns `None`.
fn o200k_ascii(text: &[u8], at: usize) -> Option<usize> {
    use class::{DIGIT, END, LOWER, NEWLINE, OTHER_CHAR, PUNCT, SPACE, UPPER};
    let class = |i: usize| text.get(i).map_or(END, |&b| CLASSES[usize::from(b)]);
    let run = |mut i: usize, of: u8| {
        while class(i) == of {
            i += 1;
        }
        i
    };
    let first = class(at);
    if first == OTHER_CHAR || first == END {
        return None;
    }
    // 1 and 2.
    let letters = if first == SPACE || first == PUNCT {
        at + 1
    } else {
        at
    };
    let lower = run(letters, UPPER);
    let end = run(lower, LOWER);
    if class(lower) == OTHER_CHAR || class(end) == OTHER_CHAR {
        return None;
    }
    if end > letters {
        return contraction(text, end);
    }
    // 3.
    if first == DIGIT {
        let mut end = at + 1;
        while end < at + 3 && class(end) == DIGIT {
            end += 1;
        }
        return (end == at + 3 || class(end) != OTHER_CHAR).then_some(end);
    }
    // 4.
    if first == PUNCT || text[at] == b' ' {
        let punct = if first == PUNCT { at } else { at + 1 };
        let end = run(punct, PUNCT);
        if end > punct {
            if class(end) == OTHER_CHAR {
                return None;
            }
            let mut end = end;
            while matches!(text.get(end), Some(b'\r' | b'\n' | b'/')) {
                end += 1;
            }
            return Some(end);
        }
    }
    // 5 and 6: `first` is whitespace.
    let mut end = at;
    while matches!(class(end), SPACE | NEWLINE) {
        end += 1;
    }
    if class(end) == OTHER_CHAR {
        return None;
    }
    if let Some(last_newline) = (at..end).rev().find(|&i| class(i) == NEWLINE) {
        return Some(last_newline + 1);
    }
    Some(if end < text.len() && end - at >= 2 {
        end - 1
    } else {
        end
    })
}

/// The end of `(?i:'s|'t|'re|'ve|'m|'ll|'d)?` at `at`, where an ASCII byte or the end is; `None` if
/// a longer char decides it (`ſ` is an `s` to `(?i)`).
fn contraction(text: &[u8], at: usize) -> Option<usize> {
    if text.get(at) != Some(&b'\'') {
        return Some(at);
    }
    let lower = |i: usize| match text.get(i) {
        Some(b) if !b.is_ascii() => None,
        b => Some(b.map(u8::to_ascii_lowercase)),
    };
    // The contractions start with different letters: one of them at most can match.
    let second = match lower(at + 1)? {
        Some(b's' | b't' | b'm' | b'd') => return Some(at + 2),
        Some(b'r' | b'v') => b'e',
        Some(b'l') => b'l',
        _ => return Some(at),
    };
    Some(if lower(at + 2)? == Some(second) {
        at + 3
    } else {
        at
    })
}

/// A hash of a token's bytes, with no seed (tables are the same in every process). Word at a time,
/// as foldhash and wyhash do: a count looks up every piece, and FNV-1a, a byte at a time, was a
/// chain of as many multiplications as bytes. Tokens are short: most take one multiplication.
fn hash(bytes: &[u8]) -> u64 {
    const K0: u64 = 0x243f_6a88_85a3_08d3;
    const K1: u64 = 0x1319_8a2e_0370_7344;
    const K2: u64 = 0xa409_3822_299f_31d0;
    let n = bytes.len();
    let mut seed = K0 ^ n as u64;
    let (a, b) = match n {
        0 => (0, 0),
        1..=3 => (
            u64::from(bytes[0]),
            (u64::from(bytes[n / 2]) << 8) | u64::from(bytes[n - 1]),
        ),
        4..=8 => (read4(bytes, 0), read4(bytes, n - 4)),
        _ => {
            let mut words = bytes[..n - 1].chunks_exact(8);
            for word in &mut words {
                seed = folded_multiply(read8(word) ^ K1, seed ^ K2);
            }
            (read8(&bytes[n - 8..]), 0)
        }
    };
    folded_multiply(a ^ K1, b ^ seed)
}

/// Bytes `i..i + 4` of `bytes`, little-endian.
fn read4(bytes: &[u8], i: usize) -> u64 {
    u64::from(u32::from_le_bytes([
        bytes[i],
        bytes[i + 1],
        bytes[i + 2],
        bytes[i + 3],
    ]))
}

/// The first 8 bytes of `bytes` (8 or more), little-endian.
fn read8(bytes: &[u8]) -> u64 {
    let mut le = [0; 8];
    le.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(le)
}

/// The product of `a` and `b`, its high and low halves folded together: every bit of each moves
/// every bit of the result, in one multiplication.
fn folded_multiply(a: u64, b: u64) -> u64 {
    let product = u128::from(a) * u128::from(b);
    (product as u64) ^ ((product >> 64) as u64)
}

/// `a == b`, inline: tokens are a few bytes long, shorter than a call to `memcmp`.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    match n {
        0 => true,
        // These positions cover every byte.
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=8 => read4(a, 0) == read4(b, 0) && read4(a, n - 4) == read4(b, n - 4),
        _ => a == b,
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
    use tiktoken_rs::O200K_BASE_PAT_STR;

    use super::super::encoding::{
        CL100K_BYTES, CL100K_PATTERN, CL100K_RANKS, CL100K_SPLIT, O200K_BYTES, O200K_RANKS,
        O200K_SPLIT,
    };
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

    /// Whitespace the patterns treat apart: spaces, runs of them, tabs, `\r`, `\n` and both, Unicode
    /// spaces (no-break, ideographic, thin), separators (U+2028, NEL), and `\v`, `\f`.
    const WHITESPACE: &[&str] = &[
        " ", "  ", "\t", "\r", "\n", "\r\n", "\n\n", "\u{a0}", "\u{3000}", "\u{2009}", "\u{2028}",
        "\u{85}", "\u{b}", "\u{c}",
    ];

    /// Everything else: letters of several scripts and cases (title case, modifier, the long s and
    /// the Kelvin sign that `(?i)` folds to `s` and `k`), combining marks, digits of several kinds,
    /// punctuation, emoji with a modifier, invisible format chars, and contractions.
    const OTHERS: &[&str] = &[
        "a", "Z", "the", "Hello", "é", "ß", "ſ", "\u{212a}", "İ", "ǅ", "ʰ", "Ж", "мир", "α",
        "日本", "ア", "한", "ا", "\u{301}", "\u{94d}", "0", "7", "123", "4567", "٣", "½", "Ⅻ", ".",
        ",", "!", "?", "/", "-", "_", "(", ")", "\"", "'", "`", "{", "}", "🚀", "👍🏽", "\u{200d}",
        "\u{200b}", "\u{feff}", "'s", "'S", "'t", "'re", "'ve", "'m", "'ll", "'LL", "'d", "'D",
    ];

    /// 6,000 texts from a fixed seed: short random mixes of everything (every class next to every
    /// other, at the start and at the end of a text), whitespace-only texts, ASCII ones, and
    /// prose-like words between runs of whitespace, with leading and trailing whitespace at times.
    fn generated() -> Vec<String> {
        let mut rng = fastrand::Rng::with_seed(0x70c5);
        let mut texts = Vec::new();
        let all: Vec<&str> = WHITESPACE.iter().chain(OTHERS).copied().collect();
        for n in 0..3_000 {
            texts.push((0..=n % 20).map(|_| all[rng.usize(..all.len())]).collect());
        }
        for n in 0..500 {
            texts.push(
                (0..=n % 12)
                    .map(|_| WHITESPACE[rng.usize(..WHITESPACE.len())])
                    .collect(),
            );
        }
        // ASCII: the splitter's fast path. Any char, more often those the pattern cares about.
        let ascii: Vec<char> = " \t\r\n'sStTlLdDrReEvVmM/!.,-09aZ".chars().collect();
        for n in 0..1_500 {
            texts.push(
                (0..=n % 30)
                    .map(|_| {
                        if rng.bool() {
                            ascii[rng.usize(..ascii.len())]
                        } else {
                            char::from(rng.u8(..128))
                        }
                    })
                    .collect(),
            );
        }
        let mut pick = |units: &[&'static str]| units[rng.usize(..units.len())];
        for n in 0..1_000 {
            let mut text = String::new();
            for word in 0..=n % 8 {
                for _ in 0..(n + word) % 4 {
                    text.push_str(pick(WHITESPACE));
                }
                for _ in 0..=(n / 3 + word) % 3 {
                    text.push_str(pick(OTHERS));
                }
            }
            for _ in 0..n % 3 {
                text.push_str(pick(WHITESPACE));
            }
            texts.push(text);
        }
        texts
    }

    fn texts() -> Vec<String> {
        corpus().into_iter().chain(generated()).collect()
    }

    fn shown(text: &str) -> String {
        text.chars().take(60).collect()
    }

    #[test]
    fn split_patterns_are_tiktokens_without_the_look_ahead() {
        assert!(O200K_BASE_PAT_STR.contains(r"|\s+(?!\S)|\s+"));
        assert_eq!(
            O200K_SPLIT,
            O200K_BASE_PAT_STR.replace(r"|\s+(?!\S)|\s+", r"|\s+")
        );
        assert!(CL100K_PATTERN.ends_with(r"|\s+(?!\S)|\s"));
        let cl100k = CL100K_PATTERN
            .replace(r"|\s+(?!\S)|\s", r"|\s+")
            .replace("?+", "?")
            .replace("{1,3}+", "{1,3}")
            .replace("*+", "*")
            .replace("++", "+");
        assert_eq!(CL100K_SPLIT, cl100k);
    }

    /// The splitter's pieces are those of tiktoken's own pattern run by fancy_regex (as tiktoken-rs
    /// runs it), and giving a char back is what makes them so on many of the texts.
    #[test]
    fn splits_as_the_original_patterns() {
        let texts = texts();
        for (original, split) in [
            (O200K_BASE_PAT_STR, O200K_SPLIT),
            (CL100K_PATTERN, CL100K_SPLIT),
        ] {
            let original = fancy_regex::Regex::new(original).unwrap();
            let splitter = Splitter::new(split).unwrap();
            let mut gave_back = 0;
            for text in &texts {
                let expected: Vec<&str> = original
                    .find_iter(text)
                    .map(|m| m.unwrap().as_str())
                    .collect();
                let pieces: Vec<&str> = splitter.pieces(text).collect();
                assert_eq!(pieces, expected, "{text:?}");
                assert_eq!(pieces.concat(), *text);
                let plain: Vec<&str> = splitter.regex.find_iter(text).map(|m| m.as_str()).collect();
                if plain != pieces {
                    gave_back += 1;
                }
            }
            assert!(gave_back > 1_000, "{gave_back}");
        }
    }

    /// Wherever it starts, a piece found by the ASCII fast path is the one the DFA finds, and the
    /// fast path finds most pieces of ASCII text.
    #[test]
    fn the_ascii_fast_path_finds_the_searched_pieces() {
        let splitter = Splitter::new(O200K_SPLIT).unwrap();
        assert!(splitter.o200k);
        let mut cache = splitter.dfa.create_cache();
        let (mut fast, mut searched) = (0, 0);
        for text in texts() {
            for (at, _) in text.char_indices() {
                let expected = splitter.searched_piece(&mut cache, &text, at);
                match o200k_ascii(text.as_bytes(), at) {
                    Some(end) => {
                        assert_eq!(Some((at, end)), expected, "{text:?} at {at}");
                        fast += 1;
                    }
                    None => searched += 1,
                }
            }
        }
        assert!(fast > 50_000 && searched > 10_000, "{fast} {searched}");
        assert!(!Splitter::new(CL100K_SPLIT).unwrap().o200k);
    }

    /// The byte classes of the fast path are the pattern's.
    #[test]
    fn ascii_classes_are_the_patterns() {
        let is = |class: &str, b: u8| {
            Regex::new(&format!("^{class}$"))
                .unwrap()
                .is_match(char::from(b).encode_utf8(&mut [0; 4]))
        };
        for b in 0..=255_u8 {
            let expected = if !b.is_ascii() {
                class::OTHER_CHAR
            } else if is(r"\p{Lu}", b) {
                class::UPPER
            } else if is(r"\p{Ll}", b) {
                class::LOWER
            } else if is(r"\p{N}", b) {
                class::DIGIT
            } else if is(r"[\r\n]", b) {
                class::NEWLINE
            } else if is(r"\s", b) {
                class::SPACE
            } else {
                assert!(is(r"[^\s\p{L}\p{N}]", b));
                class::PUNCT
            };
            assert_eq!(CLASSES[usize::from(b)], expected, "{b:#x}");
        }
    }

    /// `char::is_whitespace`, which decides whether a piece gives a char back, is `\s`.
    #[test]
    fn whitespace_is_the_patterns_whitespace() {
        let every_char: String = (0..=u32::from(char::MAX))
            .filter_map(char::from_u32)
            .collect();
        let by_regex: Vec<char> = Regex::new(r"\s")
            .unwrap()
            .find_iter(&every_char)
            .flat_map(|m| m.as_str().chars())
            .collect();
        let by_std: Vec<char> = every_char.chars().filter(|c| c.is_whitespace()).collect();
        assert_eq!(by_regex, by_std);
        assert!(by_std.contains(&'\u{3000}') && by_std.contains(&'\u{85}'));
    }

    fn counts_exactly_as_tiktoken(
        load: fn() -> Option<CoreBPE>,
        ranks: Rank,
        bytes: usize,
        split: &str,
    ) {
        let bpe = load().unwrap();
        let compact = CompactBpe::load(load, ranks, bytes, split).unwrap();
        assert_eq!(compact.bytes.len(), bytes);
        // The hash spreads the tokens: linear probing at this load takes 1.3 probes on average
        // to find a token with a uniform hash.
        let mask = compact.table.len() - 1;
        let (mut tokens, mut probes) = (0, 0);
        for rank in 0..ranks {
            let token = compact.token(rank);
            if token.is_empty() {
                continue;
            }
            let mut slot = compact.slot_of(token);
            probes += 1;
            while compact.table[slot] != rank {
                slot = (slot + 1) & mask;
                probes += 1;
            }
            tokens += 1;
        }
        assert!(
            probes * 10 < tokens * 15,
            "{probes} probes for {tokens} tokens"
        );
        for text in texts() {
            assert_eq!(
                compact.count(&text),
                bpe.encode_ordinary(&text).len(),
                "{:?}",
                shown(&text)
            );
        }
    }

    #[test]
    fn counts_exactly_as_tiktoken_o200k() {
        counts_exactly_as_tiktoken(
            || tiktoken_rs::o200k_base().ok(),
            O200K_RANKS,
            O200K_BYTES,
            O200K_SPLIT,
        );
    }

    #[test]
    fn counts_exactly_as_tiktoken_cl100k() {
        counts_exactly_as_tiktoken(
            || tiktoken_rs::cl100k_base().ok(),
            CL100K_RANKS,
            CL100K_BYTES,
            CL100K_SPLIT,
        );
    }
}
