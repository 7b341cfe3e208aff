//! Which tiktoken encoding a model uses, and counting with it (`tokenizer` feature).

use std::fmt;

#[cfg(feature = "tokenizer")]
use std::sync::OnceLock;

#[cfg(feature = "tokenizer")]
use super::compact::CompactBpe;

/// Regular tokens of `o200k_base` (ranks `0..199_998`; its special tokens come after).
#[cfg(feature = "tokenizer")]
pub(crate) const O200K_RANKS: u32 = 199_998;
/// Regular tokens of `cl100k_base` (ranks `0..100_256`).
#[cfg(feature = "tokenizer")]
pub(crate) const CL100K_RANKS: u32 = 100_256;
/// `cl100k_base`'s split pattern, as tiktoken-rs writes it (it does not export this one).
#[cfg(feature = "tokenizer")]
pub(crate) const CL100K_PATTERN: &str = "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}++|\\p{N}{1,3}+| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*+|\\s++$|\\s*[\\r\\n]|\\s+(?!\\S)|\\s";

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
        let _ = self.bpe();
    }

    /// The encoding's compact table, built on first use from tiktoken's, which are freed then
    /// (see `compact`). `None` only if tiktoken's own tables fail to load, which its tests rule out.
    #[cfg(feature = "tokenizer")]
    fn bpe(self) -> Option<&'static CompactBpe> {
        static O200K: OnceLock<Option<CompactBpe>> = OnceLock::new();
        static CL100K: OnceLock<Option<CompactBpe>> = OnceLock::new();
        let (cell, ranks, pattern, load): (_, _, _, fn() -> _) = match self {
            Encoding::O200k => (
                &O200K,
                O200K_RANKS,
                tiktoken_rs::O200K_BASE_PAT_STR,
                tiktoken_rs::o200k_base,
            ),
            Encoding::Cl100k => (
                &CL100K,
                CL100K_RANKS,
                CL100K_PATTERN,
                tiktoken_rs::cl100k_base,
            ),
        };
        cell.get_or_init(|| {
            let compact = load()
                .ok()
                .and_then(|bpe| CompactBpe::from_tiktoken(&bpe, ranks, pattern));
            if compact.is_none() {
                tracing::error!(
                    encoding = self.name(),
                    "cannot load the tokenizer tables; prompts are estimated from their length"
                );
            }
            compact
        })
        .as_ref()
    }
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
