//! Which tiktoken encoding a model uses, and counting with it (`tokenizer` feature).

use std::fmt;

#[cfg(feature = "tokenizer")]
use tiktoken_rs::CoreBPE;

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

    #[cfg(feature = "tokenizer")]
    fn bpe(self) -> &'static CoreBPE {
        match self {
            Encoding::O200k => tiktoken_rs::o200k_base_singleton(),
            Encoding::Cl100k => tiktoken_rs::cl100k_base_singleton(),
        }
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
    encoding.bpe().encode_ordinary(text).len() as u64
}
