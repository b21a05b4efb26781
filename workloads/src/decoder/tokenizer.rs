//! The byte-level BPE tokenizer, rebuilt from a GGUF's vocabulary and
//! merges, and the chat template of the instruct models.
//!
//! The pre-tokenizer (how text is cut into words before merging) is not in
//! the vocabulary; the GGUF names it in `tokenizer.ggml.pre`, and we build
//! the one each name stands for in the upstream `tokenizer.json`:
//! - `qwen2`: NFC, then a split on Qwen's pattern, which isolates every digit
//!   (`\p{N}`, where GPT-2's pattern takes ` ?\p{N}+`) and lets one
//!   non-letter prefix a word;
//! - `smollm`: every digit on its own, then GPT-2's byte-level pattern;
//! - `gpt2`: GPT-2's byte-level pattern.
//!
//! candle's `TokenizerFromGguf` maps `smollm` to plain GPT-2, which merges
//! runs of digits that SmolLM2 was trained to see one at a time; hence our
//! own construction.

use std::collections::HashMap;

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::DecoderError;

const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_CONTROL: u32 = 3;
const TOKEN_USER_DEFINED: u32 = 4;

/// How a model wants a conversation laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    /// The system turn the template inserts when the caller gives none.
    pub default_system: Option<String>,
}

impl ChatTemplate {
    /// One user turn and the opening of the assistant's, ChatML style
    /// (`<|im_start|>role\n...<|im_end|>\n`), as both model families'
    /// templates render it with `add_generation_prompt`.
    pub fn format(&self, system: Option<&str>, user: &str) -> String {
        let mut s = String::new();
        if let Some(sys) = system.or(self.default_system.as_deref()) {
            s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
        }
        s.push_str(&format!(
            "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        ));
        s
    }
}

/// A GGUF model's tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    eos: Option<u32>,
    chat: Option<ChatTemplate>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer(vocab {})", self.vocab_size())
    }
}

fn meta<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, DecoderError> {
    ct.metadata.get(key).ok_or_else(|| DecoderError::Metadata {
        key: key.to_string(),
        problem: "missing".into(),
    })
}

fn bad(key: &str, e: impl std::fmt::Display) -> DecoderError {
    DecoderError::Metadata {
        key: key.to_string(),
        problem: e.to_string(),
    }
}

fn strings(ct: &gguf_file::Content, key: &str) -> Result<Vec<String>, DecoderError> {
    meta(ct, key)?
        .to_vec()
        .map_err(|e| bad(key, e))?
        .iter()
        .map(|v| v.to_string().cloned().map_err(|e| bad(key, e)))
        .collect()
}

impl Tokenizer {
    /// Builds the tokenizer from the metadata of a GGUF file.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Tokenizer, DecoderError> {
        let key = "tokenizer.ggml.model";
        let model = meta(ct, key)?.to_string().map_err(|e| bad(key, e))?;
        if model != "gpt2" {
            return Err(DecoderError::Unsupported {
                what: format!("tokenizer model `{model}`"),
                problem: "only byte-level BPE (`gpt2`) is implemented".into(),
            });
        }
        let tokens = strings(ct, "tokenizer.ggml.tokens")?;
        let merges = strings(ct, "tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad("tokenizer.ggml.merges", format!("bad merge `{m}`")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| DecoderError::Tokenizer(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);

        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map_or("gpt2", |s| s.as_str());
        let tk = |e: tokenizers::Error| DecoderError::Tokenizer(e.to_string());
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "qwen2" => {
                inner.with_normalizer(Some(NFC)).map_err(tk)?;
                let split = Split::new(
                    SplitPattern::Regex(QWEN2_PATTERN.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(tk)?;
                Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, false, false).into(),
                ])
                .into()
            }
            "smollm" => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            "gpt2" | "default" => ByteLevel::new(false, true, true).into(),
            other => {
                return Err(DecoderError::Unsupported {
                    what: format!("pre-tokenizer `{other}`"),
                    problem: "known: qwen2, smollm, gpt2".into(),
                })
            }
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::new(false, false, false)));

        // Control and user-defined tokens are matched whole in the input
        // (so a chat template's `<|im_start|>` becomes one id).
        let key = "tokenizer.ggml.token_type";
        let types = meta(ct, key)?.to_vec().map_err(|e| bad(key, e))?;
        let mut added = Vec::new();
        for (i, t) in types.iter().enumerate() {
            let t = t.to_i32().map_err(|e| bad(key, e))? as u32;
            if t == TOKEN_CONTROL || t == TOKEN_USER_DEFINED {
                added.push(AddedToken::from(tokens[i].clone(), t == TOKEN_CONTROL));
            }
        }
        inner.add_special_tokens(added).map_err(tk)?;

        let eos = ct
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(|v| v.to_u32().ok());
        let has = |t: &str| tokens.iter().any(|x| x == t);
        let chat = (has("<|im_start|>") && has("<|im_end|>")).then(|| ChatTemplate {
            default_system: match pre {
                "qwen2" => Some(
                    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.".into(),
                ),
                "smollm" => Some(
                    "You are a helpful AI assistant named SmolLM, trained by Hugging Face".into(),
                ),
                _ => None,
            },
        });
        Ok(Tokenizer { inner, eos, chat })
    }

    /// Token ids of `text`; special tokens written in the text are
    /// recognised, nothing (no BOS) is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DecoderError> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| DecoderError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, DecoderError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| DecoderError::Tokenizer(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// End of a turn / of text: what generation stops at.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// The chat template, for the instruct models that have ChatML tokens.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// `vocab` as a map (for tests and tools).
    pub fn vocab(&self) -> HashMap<String, u32> {
        self.inner.get_vocab(true)
    }
}
