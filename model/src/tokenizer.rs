//! CLIP tokenizer producing exactly the ids of transformers' `CLIPTokenizer` as the diffusers
//! pipelines call it (`padding="max_length"`, `truncation=True`, `max_length=model_max_length`):
//! BOS + text tokens (truncated) + EOS, padded with the pad token.
//!
//! Both sources a tokenizer folder can have run on the `tokenizers` crate:
//! - `tokenizer.json` (any Hugging Face `tokenizers` model), loaded as it is;
//! - CLIP's `vocab.json` + `merges.txt`, assembled into the pipeline transformers 5.x builds for
//!   `CLIPTokenizer` ([`clip_bpe_tokenizer`]: NFC, whitespace runs to one space, lower-casing,
//!   CLIP's split pattern, byte-level mapping, BPE with `</w>` word ends). Unlike the old Python
//!   tokenizer it does no ftfy fixing and no HTML unescaping, so "&amp;" stays three pieces.
//!
//! `tokenizer.json` wins when both are present. Special tokens, `model_max_length` and the pad token
//! (SD-1 "<|endoftext|>", SD-2 "!") come from `tokenizer_config.json` / `special_tokens_map.json`.
//! BOS, EOS, truncation and padding are ours rather than the file's post-processor and padding
//! settings, so that `encode_detailed` can also report where the text's words went.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

use crate::error::{ModelError, Result};

/// CLIP's context length; used when `model_max_length` is absent or transformers' "unbounded" marker.
pub const DEFAULT_MAX_LENGTH: usize = 77;
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";
/// transformers writes ~1e30 for "no limit"; anything this large is not a real context length.
const MAX_SANE_LENGTH: u64 = 1 << 20;
/// CLIP's pre-tokenisation (the `Split` pattern of transformers' `CLIPTokenizer`); whitespace
/// between the matches is dropped.
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The token ids of one prompt and where its words ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    /// Exactly `max_length` ids: BOS, the text's tokens, EOS, padding.
    pub ids: Vec<u32>,
    /// Positions of the text's own tokens (no BOS/EOS/padding), after truncation.
    pub content: Range<usize>,
    /// Each whitespace-separated word of the input that kept at least one token, in order.
    /// Words whose tokens were all truncated away are omitted.
    pub words: Vec<WordSpan>,
}

/// A whitespace-separated word of the input and the positions of its tokens in `ids`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WordSpan {
    pub word: String,
    pub tokens: Range<usize>,
}

/// CLIP tokenizer for a diffusers `tokenizer/` folder.
pub struct ClipTokenizer {
    tokenizer: Box<Tokenizer>,
    /// The file the tokenizer was built from (`tokenizer.json` or `vocab.json`).
    source: PathBuf,
    /// The tokenizer's post-processor adds its own special tokens (e.g. CLIP's BOS/EOS), so we
    /// must not.
    post_processor_adds: usize,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("source", &self.source)
            .field("max_length", &self.max_length)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl ClipTokenizer {
    /// Loads `dir/tokenizer.json`, or else `dir/vocab.json` + `dir/merges.txt`, plus the optional
    /// `tokenizer_config.json` and `special_tokens_map.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let special = SpecialTokensConfig::read(dir)?;
        let json_path = dir.join("tokenizer.json");
        if json_path.is_file() {
            let tokenizer = Tokenizer::from_file(&json_path)
                .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", json_path.display())))?;
            return Self::new(tokenizer, json_path, &special);
        }
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        for path in [&vocab_path, &merges_path] {
            if !path.is_file() {
                return Err(ModelError::MissingFile { path: path.clone() });
            }
        }
        let tokenizer = clip_bpe_tokenizer(&vocab_path, &merges_path, &special)?;
        Self::new(tokenizer, vocab_path, &special)
    }

    fn new(
        mut tokenizer: Tokenizer,
        source: PathBuf,
        special: &SpecialTokensConfig,
    ) -> Result<Self> {
        let error =
            |e: tokenizers::Error| ModelError::Tokenizer(format!("{}: {e}", source.display()));
        // We truncate and pad ourselves; settings baked into the file must not interfere.
        tokenizer.with_truncation(None).map_err(error)?;
        tokenizer.with_padding(None);
        let post_processor_adds = tokenizer
            .get_post_processor()
            .map(|p| tokenizers::PostProcessor::added_tokens(p, false))
            .unwrap_or(0);
        if post_processor_adds >= special.max_length {
            return Err(ModelError::Tokenizer(format!(
                "{}: the post-processor adds {post_processor_adds} tokens, leaving no room in max_length {}",
                source.display(),
                special.max_length
            )));
        }
        let id_of = |role: &TokenRole| {
            tokenizer
                .token_to_id(&role.content)
                .ok_or_else(|| special.token_not_in_vocab(role, &source))
        };
        let bos_id = id_of(&special.bos)?;
        let eos_id = id_of(&special.eos)?;
        let pad_id = id_of(&special.pad)?;
        Ok(Self {
            tokenizer: Box::new(tokenizer),
            source,
            post_processor_adds,
            max_length: special.max_length,
            bos_id,
            eos_id,
            pad_id,
        })
    }

    /// Length of every encoded prompt (`model_max_length`, 77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Ids padded/truncated to `max_length`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_detailed(text)?.ids)
    }

    /// Ids plus the positions of the text's tokens and of each of its words.
    pub fn encode_detailed(&self, text: &str) -> Result<TokenizedPrompt> {
        let tokenizer_error =
            |e: tokenizers::Error| ModelError::Tokenizer(format!("encoding {text:?}: {e}"));
        let mut encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(tokenizer_error)?;
        let (mut ids, content, offsets) = if self.post_processor_adds > 0 {
            encoding.truncate(
                self.max_length - self.post_processor_adds,
                0,
                tokenizers::TruncationDirection::Right,
            );
            let encoding = self
                .tokenizer
                .post_process(encoding, None, true)
                .map_err(tokenizer_error)?;
            let sequence_ids = encoding.get_sequence_ids();
            let first = sequence_ids.iter().position(|s| *s == Some(0));
            let last = sequence_ids.iter().rposition(|s| *s == Some(0));
            let content = match (first, last) {
                (Some(first), Some(last)) => first..last + 1,
                // Empty text: place the (empty) content right after a leading BOS, if any.
                _ => {
                    let after_bos = usize::from(encoding.get_ids().first() == Some(&self.bos_id));
                    after_bos..after_bos
                }
            };
            (
                encoding.get_ids().to_vec(),
                content,
                encoding.get_offsets().to_vec(),
            )
        } else {
            // Room for the text's own tokens next to the BOS and EOS we add.
            encoding.truncate(
                self.max_length.saturating_sub(2),
                0,
                tokenizers::TruncationDirection::Right,
            );
            let mut ids = Vec::with_capacity(encoding.len() + 2);
            ids.push(self.bos_id);
            ids.extend_from_slice(encoding.get_ids());
            ids.push(self.eos_id);
            let mut offsets = vec![(0, 0)];
            offsets.extend_from_slice(encoding.get_offsets());
            (ids, 1..1 + encoding.len(), offsets)
        };
        let words = word_spans_from_offsets(text, content.clone(), &offsets);
        ids.truncate(self.max_length);
        ids.resize(self.max_length, self.pad_id);
        Ok(TokenizedPrompt {
            ids,
            content,
            words,
        })
    }
}

/// Assigns each content token to the whitespace-separated word its byte offsets fall in.
fn word_spans_from_offsets(
    text: &str,
    content: Range<usize>,
    offsets: &[(usize, usize)],
) -> Vec<WordSpan> {
    let mut spans: Vec<WordSpan> = Vec::new();
    for (word, word_range) in whitespace_words(text) {
        let overlaps = |pos: &usize| {
            offsets.get(*pos).is_some_and(|&(start, end)| {
                start < word_range.end
                    && (end > word_range.start || (start == end && start >= word_range.start))
            })
        };
        let first = content.clone().find(overlaps);
        let last = content.clone().rev().find(overlaps);
        if let (Some(first), Some(last)) = (first, last) {
            spans.push(WordSpan {
                word: word.to_string(),
                tokens: first..last + 1,
            });
        }
    }
    spans
}

/// Whitespace-separated words of `text` with their byte ranges.
fn whitespace_words(text: &str) -> impl Iterator<Item = (&str, Range<usize>)> {
    text.split(char::is_whitespace)
        .filter(|w| !w.is_empty())
        .map(move |word| {
            // `split` yields subslices of `text`, so the pointer difference is the byte offset.
            let start = word.as_ptr() as usize - text.as_ptr() as usize;
            (word, start..start + word.len())
        })
}

/// One special-token role (bos/eos/unk/pad) as the config files spell it.
#[derive(Debug, Clone)]
struct TokenRole {
    key: &'static str,
    content: String,
    /// Matched in the normalised (lower-cased) text rather than the raw text.
    normalized: bool,
    /// The file the value came from, for error messages.
    source: Option<PathBuf>,
}

/// What `tokenizer_config.json` and `special_tokens_map.json` say about special tokens and length.
#[derive(Debug, Clone)]
struct SpecialTokensConfig {
    bos: TokenRole,
    eos: TokenRole,
    unk: TokenRole,
    pad: TokenRole,
    max_length: usize,
    /// `added_tokens_decoder` of tokenizer_config.json: content -> (id, normalized).
    added_tokens_decoder: Vec<(String, u32, bool)>,
}

impl SpecialTokensConfig {
    fn read(dir: &Path) -> Result<Self> {
        let role = |key: &'static str, content: &str| TokenRole {
            key,
            content: content.to_string(),
            normalized: false,
            source: None,
        };
        let mut config = Self {
            bos: role("bos_token", DEFAULT_BOS),
            eos: role("eos_token", DEFAULT_EOS),
            unk: role("unk_token", DEFAULT_EOS),
            pad: role("pad_token", DEFAULT_EOS),
            max_length: DEFAULT_MAX_LENGTH,
            added_tokens_decoder: Vec::new(),
        };
        // special_tokens_map.json is read second: transformers lets it override tokenizer_config.json.
        let tokenizer_config = dir.join("tokenizer_config.json");
        if let Some(json) = read_optional_json(&tokenizer_config)? {
            config.apply_roles(&json, &tokenizer_config)?;
            config.apply_tokenizer_config(&json, &tokenizer_config)?;
        }
        let special_tokens_map = dir.join("special_tokens_map.json");
        if let Some(json) = read_optional_json(&special_tokens_map)? {
            config.apply_roles(&json, &special_tokens_map)?;
        }
        Ok(config)
    }

    fn roles_mut(&mut self) -> [&mut TokenRole; 4] {
        [&mut self.bos, &mut self.eos, &mut self.unk, &mut self.pad]
    }

    fn roles(&self) -> [&TokenRole; 4] {
        [&self.bos, &self.eos, &self.unk, &self.pad]
    }

    fn apply_roles(&mut self, json: &Value, file: &Path) -> Result<()> {
        for role in self.roles_mut() {
            let Some(value) = json.get(role.key) else {
                continue;
            };
            let (content, normalized) = match value {
                Value::Null => continue,
                Value::String(s) => (s.clone(), false),
                Value::Object(fields) => {
                    let content =
                        fields
                            .get("content")
                            .and_then(Value::as_str)
                            .ok_or_else(|| {
                                crate::config::unsupported(
                                    file,
                                    role.key,
                                    format!("{value} (no string `content`)"),
                                )
                            })?;
                    let normalized = fields
                        .get("normalized")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                    (content.to_string(), normalized)
                }
                other => return Err(crate::config::unsupported(file, role.key, other)),
            };
            role.content = content;
            role.normalized = normalized;
            role.source = Some(file.to_path_buf());
        }
        Ok(())
    }

    fn apply_tokenizer_config(&mut self, json: &Value, file: &Path) -> Result<()> {
        if let Some(value) = json.get("model_max_length") {
            let length = value
                .as_u64()
                .or_else(|| {
                    value
                        .as_f64()
                        .filter(|v| *v >= 0.0)
                        .map(|v| v.min(u64::MAX as f64) as u64)
                })
                .ok_or_else(|| crate::config::unsupported(file, "model_max_length", value))?;
            if length < MAX_SANE_LENGTH {
                if length < 2 {
                    return Err(crate::config::unsupported(file, "model_max_length", length));
                }
                self.max_length = length as usize;
            }
        }
        if let Some(decoder) = json.get("added_tokens_decoder").and_then(Value::as_object) {
            let bad_entry =
                |what: String| crate::config::unsupported(file, "added_tokens_decoder", what);
            for (id, token) in decoder {
                let id: u32 = id
                    .parse()
                    .map_err(|_| bad_entry(format!("non-numeric id {id:?}")))?;
                let content = token
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad_entry(format!("entry {id} has no `content`")))?;
                let normalized = token
                    .get("normalized")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                self.added_tokens_decoder
                    .push((content.to_string(), id, normalized));
            }
        }
        Ok(())
    }

    fn token_not_in_vocab(&self, role: &TokenRole, vocab_file: &Path) -> ModelError {
        let origin = match &role.source {
            Some(source) => format!("`{}` from {}", role.key, source.display()),
            None => format!("default `{}`", role.key),
        };
        ModelError::Tokenizer(format!(
            "{}: {origin} {:?} is not in the vocabulary",
            vocab_file.display(),
            role.content
        ))
    }

    /// The special tokens matched inside user text, as transformers registers them: the roles, with
    /// `normalized` true only if every role spelling that content says so (a plain string means
    /// false), overridden by `added_tokens_decoder` when the config has one.
    fn added_tokens(&self, vocab: &HashMap<String, u32>) -> Vec<AddedToken> {
        let mut tokens: Vec<AddedToken> = Vec::new();
        for (content, id, normalized) in &self.added_tokens_decoder {
            tokens.push(AddedToken {
                content: content.clone(),
                id: *id,
                normalized: *normalized,
            });
        }
        for role in self.roles() {
            if tokens
                .iter()
                .any(|t| t.content == role.content && self.in_decoder(&t.content))
            {
                continue;
            }
            let Some(&id) = vocab.get(&role.content) else {
                continue;
            };
            match tokens.iter_mut().find(|t| t.content == role.content) {
                Some(existing) => existing.normalized &= role.normalized,
                None => tokens.push(AddedToken {
                    content: role.content.clone(),
                    id,
                    normalized: role.normalized,
                }),
            }
        }
        tokens.retain(|t| !t.content.is_empty());
        tokens
    }

    fn in_decoder(&self, content: &str) -> bool {
        self.added_tokens_decoder
            .iter()
            .any(|(c, _, _)| c == content)
    }
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    crate::config::read_json(path).map(Some)
}

/// A special token recognised verbatim in the input text.
#[derive(Debug, Clone)]
struct AddedToken {
    content: String,
    id: u32,
    normalized: bool,
}

/// The `tokenizers` pipeline transformers 5.x builds for `CLIPTokenizer` from `vocab.json` and
/// `merges.txt`, with the special tokens the config files name matched verbatim in the text.
fn clip_bpe_tokenizer(
    vocab_path: &Path,
    merges_path: &Path,
    special: &SpecialTokensConfig,
) -> Result<Tokenizer> {
    let mut vocab: HashMap<String, u32> = crate::config::read_json(vocab_path)?;
    let merges_text = std::fs::read_to_string(merges_path).map_err(|source| ModelError::Io {
        path: merges_path.to_path_buf(),
        cause: source,
    })?;
    let merges = parse_merges(&merges_text, merges_path, &vocab)?;
    let added = special.added_tokens(&vocab);
    // An `added_tokens_decoder` entry outside vocab.json keeps the id the config gives it.
    for token in &added {
        vocab.entry(token.content.clone()).or_insert(token.id);
    }
    let error = |what: &str, e: tokenizers::Error| {
        ModelError::Tokenizer(format!("{}: {what}: {e}", vocab_path.display()))
    };
    let mut bpe = BPE::builder()
        .vocab_and_merges(
            vocab
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect::<tokenizers::models::bpe::Vocab>(),
            merges,
        )
        .end_of_word_suffix(END_OF_WORD.to_string())
        .fuse_unk(false);
    // Without an unknown token in the vocabulary, symbols outside it are dropped.
    if vocab.contains_key(&special.unk.content) {
        bpe = bpe.unk_token(special.unk.content.clone());
    }
    let mut tokenizer = Tokenizer::new(bpe.build().map_err(|e| error("BPE", e))?);
    let whitespace_runs = Replace::new(
        tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
        " ",
    )
    .map_err(|e| error("whitespace pattern", e))?;
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            whitespace_runs.into(),
            Lowercase.into(),
        ])))
        .map_err(|e| error("normalizer", e))?;
    let clip_split = Split::new(
        SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )
    .map_err(|e| error("CLIP split pattern", e))?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        clip_split.into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer
        .add_special_tokens(added.into_iter().map(|token| {
            tokenizers::AddedToken::from(token.content, true).normalized(token.normalized)
        }))
        .map_err(|e| error("special tokens", e))?;
    Ok(tokenizer)
}

/// `merges.txt`: one "left right" pair per line, rank = line order; "#version" lines are skipped.
/// Checked here (rather than by the BPE builder) so an error names the line. A pair listed twice
/// keeps its first (best) rank; the BPE builder would keep the last.
fn parse_merges(
    text: &str,
    path: &Path,
    vocab: &HashMap<String, u32>,
) -> Result<Vec<(String, String)>> {
    let mut merges = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (line_index, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.is_empty() {
            continue;
        }
        let bad = |message: String| {
            ModelError::Tokenizer(format!("{}:{}: {message}", path.display(), line_index + 1))
        };
        let mut parts = line.split(' ');
        let (Some(left), Some(right), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad(format!(
                "expected two space-separated symbols, found {line:?}"
            )));
        };
        for token in [left, right, &format!("{left}{right}")] {
            if !vocab.contains_key(token) {
                return Err(bad(format!("merge symbol {token:?} is not in vocab.json")));
            }
        }
        if seen.insert((left, right)) {
            merges.push((left.to_string(), right.to_string()));
        }
    }
    Ok(merges)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each word of `prompt` with the token range it covers.
    fn word_spans(prompt: &TokenizedPrompt) -> Vec<(&str, std::ops::Range<usize>)> {
        prompt
            .words
            .iter()
            .map(|w| (w.word.as_str(), w.tokens.clone()))
            .collect()
    }

    /// A tiny CLIP-style vocabulary: all byte symbols (plain and `</w>`), a few merges, specials.
    fn write_tiny_clip(dir: &Path, merges: &[(&str, &str)], extra_config: Option<Value>) {
        let mut byte_chars: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        byte_chars.sort_unstable();
        let mut vocab: Vec<String> = byte_chars.iter().map(|c| c.to_string()).collect();
        vocab.extend(byte_chars.iter().map(|c| format!("{c}</w>")));
        for (l, r) in merges {
            vocab.push(format!("{l}{r}"));
        }
        vocab.push(DEFAULT_BOS.into());
        vocab.push(DEFAULT_EOS.into());
        let vocab: serde_json::Map<String, Value> = vocab
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, Value::from(i)))
            .collect();
        std::fs::write(dir.join("vocab.json"), Value::Object(vocab).to_string()).unwrap();
        let mut text = String::from("#version: 0.2\n");
        for (l, r) in merges {
            text.push_str(&format!("{l} {r}\n"));
        }
        std::fs::write(dir.join("merges.txt"), text).unwrap();
        if let Some(config) = extra_config {
            std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        }
    }

    fn id(tok: &ClipTokenizer, token: &str) -> u32 {
        tok.tokenizer.token_to_id(token).unwrap()
    }

    #[test]
    fn tokenizer_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ClipTokenizer>();
        assert_send_sync::<crate::text_encoder::ClipTextEncoder>();
    }

    #[test]
    fn bpe_merges_by_rank_and_marks_word_ends() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_clip(
            dir.path(),
            &[("c", "a"), ("ca", "t</w>"), ("a", "t</w>")],
            Some(serde_json::json!({"model_max_length": 8})),
        );
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.max_length(), 8);
        let prompt = tok.encode_detailed("CAT  at\tc").unwrap();
        let (bos, eos) = (tok.bos_id(), tok.eos_id());
        assert_eq!(tok.pad_id(), eos);
        let expected = [
            bos,
            id(&tok, "cat</w>"),
            id(&tok, "at</w>"),
            id(&tok, "c</w>"),
            eos,
            eos,
            eos,
            eos,
        ];
        assert_eq!(prompt.ids, expected);
        assert_eq!(prompt.content, 1..4);
        let words = word_spans(&prompt);
        assert_eq!(words, [("CAT", 1..2), ("at", 2..3), ("c", 3..4)]);
    }

    #[test]
    fn truncation_keeps_bos_and_eos_and_drops_cut_words() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_clip(
            dir.path(),
            &[],
            Some(serde_json::json!({"model_max_length": 5})),
        );
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        let prompt = tok.encode_detailed("ab c d").unwrap();
        assert_eq!(prompt.ids.len(), 5);
        assert_eq!(prompt.ids[0], tok.bos_id());
        assert_eq!(prompt.ids[4], tok.eos_id());
        assert_eq!(prompt.content, 1..4);
        let words = word_spans(&prompt);
        assert_eq!(words, [("ab", 1..3), ("c", 3..4)]);
        let empty = tok.encode_detailed("").unwrap();
        assert_eq!(empty.content, 1..1);
        assert!(empty.words.is_empty());
        assert_eq!(empty.ids[..2], [tok.bos_id(), tok.eos_id()]);
    }

    #[test]
    fn missing_vocab_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\n").unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err();
        assert!(
            matches!(&err, ModelError::MissingFile { path } if path.ends_with("vocab.json")),
            "{err}"
        );
    }

    #[test]
    fn bad_merges_line_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_clip(dir.path(), &[], None);
        std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\na b c\n").unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("merges.txt:2"), "{err}");
    }

    #[test]
    fn pad_token_not_in_vocab_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_clip(
            dir.path(),
            &[],
            Some(serde_json::json!({"pad_token": "<pad>"})),
        );
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("pad_token") && err.contains("tokenizer_config.json"),
            "{err}"
        );
    }

    #[test]
    fn huge_model_max_length_falls_back_to_clip_context() {
        let dir = tempfile::tempdir().unwrap();
        let config: Value =
            serde_json::from_str(r#"{"model_max_length": 1000000000000000019884624838656}"#)
                .unwrap();
        write_tiny_clip(dir.path(), &[], Some(config));
        assert_eq!(
            ClipTokenizer::from_dir(dir.path()).unwrap().max_length(),
            DEFAULT_MAX_LENGTH
        );
    }

    #[test]
    fn word_spans_follow_byte_offsets() {
        let text = "a  bc d";
        let offsets = [(0, 0), (0, 1), (3, 4), (4, 5), (6, 7), (0, 0)];
        let spans = word_spans_from_offsets(text, 1..4, &offsets);
        let spans: Vec<_> = spans
            .iter()
            .map(|w| (w.word.as_str(), w.tokens.clone()))
            .collect();
        assert_eq!(spans, [("a", 1..2), ("bc", 2..4)]);
    }
}
