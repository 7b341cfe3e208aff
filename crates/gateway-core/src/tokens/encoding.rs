//! Which tiktoken encoding a model uses, and counting with it (`tokenizer` feature).

use std::fmt;

#[cfg(feature = "tokenizer")]
use std::sync::{Mutex, OnceLock, PoisonError};

#[cfg(feature = "tokenizer")]
use super::compact::{CompactBpe, Reserved, release_freed_heap};

/// Regular tokens of `o200k_base` (ranks `0..199_998`; its special tokens come after).
#[cfg(feature = "tokenizer")]
pub(crate) const O200K_RANKS: u32 = 199_998;
/// Bytes of all of `o200k_base`'s regular tokens, end to end.
#[cfg(feature = "tokenizer")]
pub(crate) const O200K_BYTES: usize = 1_397_670;
/// Bytes of all of `cl100k_base`'s regular tokens, end to end.
#[cfg(feature = "tokenizer")]
pub(crate) const CL100K_BYTES: usize = 643_830;
/// Regular tokens of `cl100k_base` (ranks `0..100_256`).
#[cfg(feature = "tokenizer")]
pub(crate) const CL100K_RANKS: u32 = 100_256;
/// `cl100k_base`'s split pattern, as tiktoken-rs writes it (it does not export this one): the
/// reference the splitter is tested against.
#[cfg(all(feature = "tokenizer", test))]
pub(crate) const CL100K_PATTERN: &str = "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}++|\\p{N}{1,3}+| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*+|\\s++$|\\s*[\\r\\n]|\\s+(?!\\S)|\\s";
/// `CL100K_PATTERN` (kept for tests) for the `regex` crate, which matches the same pieces with
/// [`Splitter`](super::compact::Splitter): its tail `\s+(?!\S)|\s` is `\s+` (the splitter gives back
/// the char the look-ahead would), and its possessive quantifiers are greedy ones. Possessive or not
/// changes no match here, since a backtracking engine never backtracks into them: `\p{L}++`,
/// `\p{N}{1,3}+` and `[\r\n]*+` end their alternative; `[^\s\p{L}\p{N}]++` is followed by
/// `[\r\n]*+`, which cannot fail; giving back the char of `[^\r\n\p{L}\p{N}]?+` leaves a non-letter
/// where `\p{L}++` must start, and giving back a whitespace char of `\s++` leaves one before `$`.
#[cfg(feature = "tokenizer")]
pub(crate) const CL100K_SPLIT: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+$|\s*[\r\n]|\s+";
/// tiktoken-rs's `O200K_BASE_PAT_STR` for the `regex` crate, which matches the same pieces with
/// [`Splitter`](super::compact::Splitter): its alternatives `\s+(?!\S)|\s+` are one `\s+`.
#[cfg(feature = "tokenizer")]
pub(crate) const O200K_SPLIT: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"\p{N}{1,3}",
    "|",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    "|",
    r"\s*[\r\n]+",
    "|",
    r"\s+",
);

/// A tiktoken encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// `o200k_base`: gpt-4o, gpt-4.1, gpt-5, the o-series, and unknown models.
    O200k,
    /// `cl100k_base`: gpt-4 (not 4o), gpt-3.5, text-embedding-ada-002 and text-embedding-3-*.
    Cl100k,
}

impl Encoding {
    /// tiktoken's name for the encoding.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::O200k => "o200k_base",
            Encoding::Cl100k => "cl100k_base",
        }
    }

    /// Loads the encoding now (once per process), so the first request does not pay for it.
    #[cfg(feature = "tokenizer")]
    pub fn warm_up(self) {
        Self::warm_up_all([self]);
    }

    /// Loads these encodings now, those not loaded yet, together: the memory tiktoken takes for a
    /// moment while each loads is then returned to the OS at once (see `compact`).
    #[cfg(feature = "tokenizer")]
    pub fn warm_up_all(encodings: impl IntoIterator<Item = Encoding>) {
        let _loading = LOADING.lock().unwrap_or_else(PoisonError::into_inner);
        let mut wanted: Vec<Encoding> = Vec::new();
        for e in encodings {
            if !wanted.contains(&e) && e.spec().cell.get().is_none() {
                wanted.push(e);
            }
        }
        let mut reserved: Vec<_> = wanted
            .iter()
            .map(|e| {
                let spec = e.spec();
                Reserved::new(spec.ranks, spec.bytes, spec.split)
            })
            .collect();
        for (e, r) in wanted.iter().zip(&mut reserved) {
            if r.as_mut().and_then(|r| r.copy(e.spec().load)).is_none() {
                *r = None;
            }
        }
        release_freed_heap();
        for (e, r) in wanted.into_iter().zip(reserved) {
            e.spec()
                .cell
                .get_or_init(|| e.loaded(r.map(Reserved::finish)));
        }
    }

    /// The encoding's compact table, built on first use from tiktoken's, which are freed then
    /// (see `compact`). `None` only if tiktoken's own tables fail to load, which its tests rule out.
    #[cfg(feature = "tokenizer")]
    fn bpe(self) -> Option<&'static CompactBpe> {
        let spec = self.spec();
        if let Some(loaded) = spec.cell.get() {
            return loaded.as_ref();
        }
        // One load at a time: a request that needs an encoding the warm-up is loading waits for it
        // instead of loading a second copy beside it.
        let _loading = LOADING.lock().unwrap_or_else(PoisonError::into_inner);
        spec.cell
            .get_or_init(|| {
                self.loaded(CompactBpe::load(
                    spec.load, spec.ranks, spec.bytes, spec.split,
                ))
            })
            .as_ref()
    }

    #[cfg(feature = "tokenizer")]
    fn loaded(self, compact: Option<CompactBpe>) -> Option<CompactBpe> {
        if compact.is_none() {
            tracing::error!(
                encoding = self.name(),
                "cannot load the tokenizer tables; prompts are estimated from their length"
            );
        }
        compact
    }

    #[cfg(feature = "tokenizer")]
    fn spec(self) -> Spec {
        static O200K: OnceLock<Option<CompactBpe>> = OnceLock::new();
        static CL100K: OnceLock<Option<CompactBpe>> = OnceLock::new();
        match self {
            Encoding::O200k => Spec {
                cell: &O200K,
                ranks: O200K_RANKS,
                bytes: O200K_BYTES,
                split: O200K_SPLIT,
                load: || tiktoken_rs::o200k_base().ok(),
            },
            Encoding::Cl100k => Spec {
                cell: &CL100K,
                ranks: CL100K_RANKS,
                bytes: CL100K_BYTES,
                split: CL100K_SPLIT,
                load: || tiktoken_rs::cl100k_base().ok(),
            },
        }
    }
}

/// Held while tiktoken's tables are being loaded and copied (never across an `.await`).
#[cfg(feature = "tokenizer")]
static LOADING: Mutex<()> = Mutex::new(());

/// Where an encoding's compact table lives and how it is built.
#[cfg(feature = "tokenizer")]
struct Spec {
    cell: &'static OnceLock<Option<CompactBpe>>,
    ranks: u32,
    bytes: usize,
    /// The split pattern, for [`Splitter`](super::compact::Splitter).
    split: &'static str,
    load: fn() -> Option<tiktoken_rs::CoreBPE>,
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The encoding of a model, by name (case-insensitive; a deployment name such as `gpt-4o-ptu` works
/// when it starts with the model's name).
///
/// `cl100k_base` for `gpt-4` and its variants other than `gpt-4o`/`gpt-4.1`/`gpt-4.5`, `gpt-35-turbo`
/// and `gpt-3.5*`, `text-embedding-ada-002`, `text-embedding-3-*`, `davinci-002` and `babbage-002`;
/// `o200k_base` for everything else: `gpt-4o*`, `gpt-4.1*`, `gpt-5*`, `o1*`, `o3*`, `o4*` and unknown
/// names.
pub fn encoding_for_model(model: &str) -> Encoding {
    let model = model.trim();
    let starts = |prefix: &str| {
        model
            .get(..prefix.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
    };
    if starts("gpt-4o") || starts("gpt-4.") {
        return Encoding::O200k;
    }
    const CL100K: [&str; 7] = [
        "gpt-4",
        "gpt-35",
        "gpt-3.5",
        "text-embedding-ada-002",
        "text-embedding-3-",
        "davinci-002",
        "babbage-002",
    ];
    if CL100K.iter().any(|prefix| starts(prefix)) {
        Encoding::Cl100k
    } else {
        Encoding::O200k
    }
}

/// Tokens in `text` (`encode_ordinary`: special tokens count as plain text).
#[cfg(feature = "tokenizer")]
pub fn count(encoding: Encoding, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    match encoding.bpe() {
        Some(bpe) => bpe.count(text) as u64,
        None => (text.len() as u64).div_ceil(4),
    }
}
