//! CLIP tokenizer producing exactly the ids of transformers' `CLIPTokenizer` as the diffusers
//! pipelines call it (`padding="max_length"`, `truncation=True`, `max_length=model_max_length`):
//! BOS + text tokens (truncated) + EOS, padded with the pad token.
//!
//! Two sources, in a tokenizer folder:
//! - `tokenizer.json` (any Hugging Face `tokenizers` model), run by the `tokenizers` crate;
//! - CLIP's `vocab.json` + `merges.txt`, run by our own byte-level BPE ([`ClipBpe`]), which mirrors
//!   transformers 5.x (a `tokenizers` pipeline: NFC, whitespace runs to one space, lower-casing,
//!   CLIP's split regex, byte-level mapping, BPE with `</w>`). Unlike the old Python tokenizer it
//!   does no ftfy fixing and no HTML unescaping, so "&amp;" stays three pieces.
//!
//! `tokenizer.json` wins when both are present. Special tokens, `model_max_length` and the pad token
//! (SD-1 "<|endoftext|>", SD-2 "!") come from `tokenizer_config.json` / `special_tokens_map.json`.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::Value;

use crate::error::{ModelError, Result};

/// CLIP's context length; used when `model_max_length` is absent or transformers' "unbounded" marker.
pub const DEFAULT_MAX_LENGTH: usize = 77;
const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";
/// transformers writes ~1e30 for "no limit"; anything this large is not a real context length.
const MAX_SANE_LENGTH: u64 = 1 << 20;
/// The BPE cache is cleared when it grows past this many words (user text is unbounded).
const BPE_CACHE_CAPACITY: usize = 10_000;

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
    backend: Backend,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

enum Backend {
    Bpe(Box<ClipBpe>),
    Json {
        tokenizer: Box<tokenizers::Tokenizer>,
        /// The file's post-processor adds its own special tokens (e.g. CLIP's BOS/EOS), so we must not.
        post_processor_adds: usize,
    },
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let backend = match &self.backend {
            Backend::Bpe(_) => "vocab.json+merges.txt",
            Backend::Json { .. } => "tokenizer.json",
        };
        f.debug_struct("ClipTokenizer")
            .field("backend", &backend)
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
            return Self::from_tokenizer_json(&json_path, &special);
        }
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        for path in [&vocab_path, &merges_path] {
            if !path.is_file() {
                return Err(ModelError::MissingFile { path: path.clone() });
            }
        }
        let bpe = ClipBpe::from_files(&vocab_path, &merges_path, &special)?;
        let id_of = |role: &TokenRole| {
            bpe.vocab
                .get(&role.content)
                .copied()
                .ok_or_else(|| special.token_not_in_vocab(role, &vocab_path))
        };
        let bos_id = id_of(&special.bos)?;
        let eos_id = id_of(&special.eos)?;
        let pad_id = id_of(&special.pad)?;
        Ok(Self {
            backend: Backend::Bpe(Box::new(bpe)),
            max_length: special.max_length,
            bos_id,
            eos_id,
            pad_id,
        })
    }

    fn from_tokenizer_json(path: &Path, special: &SpecialTokensConfig) -> Result<Self> {
        let mut tokenizer = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        // We truncate and pad ourselves; settings baked into the file must not interfere.
        tokenizer
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        tokenizer.with_padding(None);
        let post_processor_adds = tokenizer
            .get_post_processor()
            .map(|p| tokenizers::PostProcessor::added_tokens(p, false))
            .unwrap_or(0);
        if post_processor_adds >= special.max_length {
            return Err(ModelError::Tokenizer(format!(
                "{}: the post-processor adds {post_processor_adds} tokens, leaving no room in max_length {}",
                path.display(),
                special.max_length
            )));
        }
        let id_of = |role: &TokenRole| {
            tokenizer
                .token_to_id(&role.content)
                .ok_or_else(|| special.token_not_in_vocab(role, path))
        };
        let bos_id = id_of(&special.bos)?;
        let eos_id = id_of(&special.eos)?;
        let pad_id = id_of(&special.pad)?;
        Ok(Self {
            backend: Backend::Json {
                tokenizer: Box::new(tokenizer),
                post_processor_adds,
            },
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
        let mut prompt = match &self.backend {
            Backend::Bpe(bpe) => self.encode_with_bpe(bpe, text),
            Backend::Json {
                tokenizer,
                post_processor_adds,
            } => self.encode_with_json(tokenizer, *post_processor_adds, text)?,
        };
        prompt.ids.truncate(self.max_length);
        prompt.ids.resize(self.max_length, self.pad_id);
        Ok(prompt)
    }

    /// Room for the text's own tokens when we add BOS and EOS ourselves.
    fn content_budget(&self) -> usize {
        self.max_length.saturating_sub(2)
    }

    fn encode_with_bpe(&self, bpe: &ClipBpe, text: &str) -> TokenizedPrompt {
        let budget = self.content_budget();
        let mut ids = vec![self.bos_id];
        let mut words = Vec::new();
        // No token and no normalisation step crosses whitespace, so encoding word by word gives
        // the same ids as encoding the whole text and tells us where each word's tokens are.
        for word in text.split(char::is_whitespace).filter(|w| !w.is_empty()) {
            let content_len = ids.len() - 1;
            if content_len >= budget {
                break;
            }
            let start = ids.len();
            let mut word_ids = Vec::new();
            bpe.encode_word(word, &mut word_ids);
            word_ids.truncate(budget - content_len);
            ids.extend_from_slice(&word_ids);
            if ids.len() > start {
                words.push(WordSpan {
                    word: word.to_string(),
                    tokens: start..ids.len(),
                });
            }
        }
        let content = 1..ids.len();
        ids.push(self.eos_id);
        TokenizedPrompt {
            ids,
            content,
            words,
        }
    }

    fn encode_with_json(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        post_processor_adds: usize,
        text: &str,
    ) -> Result<TokenizedPrompt> {
        let tokenizer_error =
            |e: tokenizers::Error| ModelError::Tokenizer(format!("encoding {text:?}: {e}"));
        let mut encoding = tokenizer.encode(text, false).map_err(tokenizer_error)?;
        let (ids, content, offsets) = if post_processor_adds > 0 {
            encoding.truncate(
                self.max_length - post_processor_adds,
                0,
                tokenizers::TruncationDirection::Right,
            );
            let encoding = tokenizer
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
            encoding.truncate(
                self.content_budget(),
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
            for (id, token) in decoder {
                let id: u32 = id.parse().map_err(|_| {
                    crate::config::unsupported(
                        file,
                        "added_tokens_decoder",
                        format!("non-numeric id {id:?}"),
                    )
                })?;
                let content = token
                    .get("content")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        crate::config::unsupported(
                            file,
                            "added_tokens_decoder",
                            format!("entry {id} has no `content`"),
                        )
                    })?;
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
        // Words never contain whitespace (see `encode_with_bpe`), so such a token could never match.
        tokens.retain(|t| !t.content.is_empty() && !t.content.chars().any(char::is_whitespace));
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

/// CLIP's byte-level BPE from `vocab.json` + `merges.txt`.
struct ClipBpe {
    vocab: HashMap<String, u32>,
    /// (left id, right id) -> (rank, id of the merged token).
    merges: HashMap<(u32, u32), (u32, u32)>,
    unk_id: Option<u32>,
    byte_chars: [char; 256],
    raw_added: Vec<AddedToken>,
    normalized_added: Vec<AddedToken>,
    /// CLIP's pre-tokenisation (transformers' `Split` pattern).
    clip_split: regex::Regex,
    /// The GPT-2 pattern of the `ByteLevel` pre-tokenizer, restricted to whitespace-free pieces;
    /// it only matters for pieces like "<|endoftext|>" that CLIP's pattern keeps whole.
    byte_level_split: regex::Regex,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl ClipBpe {
    fn from_files(
        vocab_path: &Path,
        merges_path: &Path,
        special: &SpecialTokensConfig,
    ) -> Result<Self> {
        let vocab: HashMap<String, u32> = crate::config::read_json(vocab_path)?;
        let merges_text =
            std::fs::read_to_string(merges_path).map_err(|source| ModelError::Io {
                path: merges_path.to_path_buf(),
                cause: source,
            })?;
        let merges = parse_merges(&merges_text, merges_path, &vocab)?;
        let unk_id = vocab.get(&special.unk.content).copied();
        let (normalized_added, raw_added) = special
            .added_tokens(&vocab)
            .into_iter()
            .partition(|t| t.normalized);
        let clip_split = regex::Regex::new(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .map_err(|e| ModelError::Tokenizer(format!("CLIP split pattern: {e}")))?;
        let byte_level_split =
            regex::Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+")
                .map_err(|e| ModelError::Tokenizer(format!("byte-level pattern: {e}")))?;
        Ok(Self {
            vocab,
            merges,
            unk_id,
            byte_chars: bytes_to_unicode(),
            raw_added,
            normalized_added,
            clip_split,
            byte_level_split,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Appends the ids of one whitespace-free word of raw input.
    fn encode_word(&self, word: &str, out: &mut Vec<u32>) {
        for raw_part in split_added(word, &self.raw_added) {
            let text = match raw_part {
                Part::Added(id) => {
                    out.push(id);
                    continue;
                }
                Part::Text(text) => normalize(text),
            };
            for part in split_added(&text, &self.normalized_added) {
                match part {
                    Part::Added(id) => out.push(id),
                    Part::Text(text) => {
                        for piece in self.clip_split.find_iter(text) {
                            for sub_piece in self.byte_level_split.find_iter(piece.as_str()) {
                                self.encode_piece(sub_piece.as_str(), out);
                            }
                        }
                    }
                }
            }
        }
    }

    fn encode_piece(&self, piece: &str, out: &mut Vec<u32>) {
        if let Ok(cache) = self.cache.lock() {
            if let Some(ids) = cache.get(piece) {
                out.extend_from_slice(ids);
                return;
            }
        }
        let ids = self.bpe(piece);
        out.extend_from_slice(&ids);
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= BPE_CACHE_CAPACITY {
                cache.clear();
            }
            cache.insert(piece.to_string(), ids);
        }
    }

    /// Byte-level BPE of one pre-token: one symbol per mapped byte, `</w>` on the last, then the
    /// lowest-ranked adjacent pair is merged (all its occurrences, left to right) until none is left.
    fn bpe(&self, piece: &str) -> Vec<u32> {
        let mapped: Vec<char> = piece.bytes().map(|b| self.byte_chars[b as usize]).collect();
        let mut symbols: Vec<u32> = Vec::with_capacity(mapped.len());
        let mut symbol = String::new();
        for (i, c) in mapped.iter().enumerate() {
            symbol.clear();
            symbol.push(*c);
            if i + 1 == mapped.len() {
                symbol.push_str(END_OF_WORD);
            }
            // Like `tokenizers` with fuse_unk=false: each unknown symbol becomes one unk token.
            match self.vocab.get(&symbol).copied().or(self.unk_id) {
                Some(id) => symbols.push(id),
                None => continue,
            }
        }
        loop {
            let best = symbols
                .windows(2)
                .filter_map(|pair| {
                    self.merges
                        .get(&(pair[0], pair[1]))
                        .map(|&(rank, _)| (rank, (pair[0], pair[1])))
                })
                .min_by_key(|&(rank, _)| rank);
            let Some((_, pair)) = best else { break };
            let merged_id = self.merges[&pair].1;
            let mut merged = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && (symbols[i], symbols[i + 1]) == pair {
                    merged.push(merged_id);
                    i += 2;
                } else {
                    merged.push(symbols[i]);
                    i += 1;
                }
            }
            symbols = merged;
        }
        symbols
    }
}

/// `merges.txt`: one "left right" pair per line, rank = line order; "#version" lines are skipped.
fn parse_merges(
    text: &str,
    path: &Path,
    vocab: &HashMap<String, u32>,
) -> Result<HashMap<(u32, u32), (u32, u32)>> {
    let mut merges = HashMap::new();
    let mut rank = 0u32;
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
        let id = |token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| bad(format!("merge symbol {token:?} is not in vocab.json")))
        };
        let merged_id = id(&format!("{left}{right}"))?;
        // Keep the first (best) rank of a pair listed twice, as `tokenizers` does.
        merges
            .entry((id(left)?, id(right)?))
            .or_insert((rank, merged_id));
        rank += 1;
    }
    Ok(merges)
}

/// NFC then per-character lower-casing, as the `tokenizers` normalisers do it (per character,
/// so a final sigma stays "σ"). Whitespace folding is not needed: callers pass single words.
fn normalize(text: &str) -> String {
    let mut normalized = tokenizers::NormalizedString::from(text);
    normalized.nfc();
    normalized.lowercase();
    normalized.get().to_string()
}

enum Part<'a> {
    Text(&'a str),
    Added(u32),
}

/// Splits `text` at the leftmost-longest occurrences of the added tokens.
fn split_added<'a>(text: &'a str, added: &[AddedToken]) -> Vec<Part<'a>> {
    if added.is_empty() {
        return vec![Part::Text(text)];
    }
    let mut parts = Vec::new();
    let mut text_start = 0;
    let mut pos = 0;
    while pos < text.len() {
        let best = added
            .iter()
            .filter(|t| text[pos..].starts_with(t.content.as_str()))
            .max_by_key(|t| t.content.len());
        match best {
            Some(token) => {
                if text_start < pos {
                    parts.push(Part::Text(&text[text_start..pos]));
                }
                parts.push(Part::Added(token.id));
                pos += token.content.len();
                text_start = pos;
            }
            None => pos += text[pos..].chars().next().map_or(1, char::len_utf8),
        }
    }
    if text_start < text.len() {
        parts.push(Part::Text(&text[text_start..]));
    }
    parts
}

/// GPT-2's reversible byte -> printable character table: printable Latin-1 bytes map to
/// themselves, the rest to consecutive code points from U+0100.
fn bytes_to_unicode() -> [char; 256] {
    let is_printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut next_extra = 256u32;
    for b in 0..=255u8 {
        table[b as usize] = if is_printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next_extra).unwrap_or('\u{FFFD}');
            next_extra += 1;
            c
        };
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny CLIP-style vocabulary: all byte symbols (plain and `</w>`), a few merges, specials.
    fn write_tiny_clip(dir: &Path, merges: &[(&str, &str)], extra_config: Option<Value>) {
        let mut vocab: Vec<String> = bytes_to_unicode().iter().map(|c| c.to_string()).collect();
        vocab.extend(bytes_to_unicode().iter().map(|c| format!("{c}</w>")));
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
        match &tok.backend {
            Backend::Bpe(bpe) => bpe.vocab[token],
            Backend::Json { tokenizer, .. } => tokenizer.token_to_id(token).unwrap(),
        }
    }

    #[test]
    fn tokenizer_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ClipTokenizer>();
        assert_send_sync::<crate::text_encoder::ClipTextEncoder>();
    }

    #[test]
    fn byte_table_is_a_bijection_onto_gpt2_chars() {
        let table = bytes_to_unicode();
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[b' ' as usize], '\u{120}');
        assert_eq!(table[0], '\u{100}');
        let unique: std::collections::HashSet<char> = table.iter().copied().collect();
        assert_eq!(unique.len(), 256);
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
        let words: Vec<_> = prompt
            .words
            .iter()
            .map(|w| (w.word.as_str(), w.tokens.clone()))
            .collect();
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
        let words: Vec<_> = prompt
            .words
            .iter()
            .map(|w| (w.word.as_str(), w.tokens.clone()))
            .collect();
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
