"""RULER (Hsieh et al., 2024), the 13 tasks of lm-eval's ``ruler`` group, generated offline.

A port of the generators in lm-eval's ``tasks/ruler`` (themselves NVIDIA's RULER, Apache-2.0): the
same templates, needles, haystacks, sizing loops, answer prefixes and string-match scoring. What
differs, and why:

* No downloads. lm-eval's RULER downloads nltk's ``punkt_tab`` when imported, its essay haystack
  from the web or the hub, and SQuAD / HotpotQA from the web. Here sentences are split by nltk's
  Punkt trained, unsupervised, on the haystack itself; the essays come from ``ruler/essays.jsonl``
  in the data directory when present, else from the public-domain text shipped in ``haystack/``
  (so the essay tasks then differ from upstream: see ``haystack/NOTICE.md``); SQuAD and HotpotQA
  must be in the data directory (a task fails at once, saying how to get them, if not).
* Reproducible by construction: every (task, length) draws from its own ``random.Random`` seeded
  from ``seed`` (metadata ``ruler_seed``, default 42), not from the global random state.
* Sequence lengths are any powers of two from 256 to 1,048,576 (metadata ``max_seq_lengths``,
  default ``[4096]``); each length is a metric of its own, and ``score`` averages all samples.
* Samples per length: metadata ``ruler_samples`` (default 500, as upstream); with ``ruler_limit``
  (``engram-hf eval --limit N``) only the N that lm-eval will read, shared out over the lengths.
* Smaller departures, each noted where it is made: QA scores "any accepted answer" as the original
  RULER does (lm-eval's port averages over the accepted answers); FWE leaves room for the answer in
  the length like every other task; essay haystacks grow in 25-word steps below 4k tokens (500
  above, as upstream); adjective-noun needle keys draw the two words independently; a sample that
  cannot fit is dropped (with a warning) rather than emitted over length.

The tokenizer that sizes the samples is the model's: metadata ``tokenizer`` or ``pretrained`` (lm-eval
passes the model arguments as metadata; ``engram-hf eval`` passes the checkpoint).
"""

from __future__ import annotations

import logging
import random
import re
import string
import uuid
import zlib
from functools import lru_cache
from importlib import resources

from tqdm.auto import tqdm

from . import data

log = logging.getLogger(__name__)

DEFAULT_LENGTHS = (4096,)
LENGTHS = tuple(2**k for k in range(8, 21))
DEFAULT_SAMPLES = 500
DEFAULT_SEED = 42

TASKS = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multiquery",
    "niah_multivalue",
    "vt",
    "cwe",
    "fwe",
    "qa_squad",
    "qa_hotpot",
)
# Tokens each task lets the model generate (they count against the sequence length, as upstream).
MAX_GEN_TOKS = {**{t: 128 for t in TASKS if t.startswith("niah")}, "vt": 30, "cwe": 120, "fwe": 50}
MAX_GEN_TOKS.update(qa_squad=32, qa_hotpot=32)
# Tasks scored by "any of the references" (QA) rather than "all of them".
PART_MATCH = ("qa_squad", "qa_hotpot")
ESSAY_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multiquery", "niah_multivalue")

# ----------------------------------------------------------------------------- shared settings


def lengths_from(metadata: dict) -> list[int]:
    value = metadata.get("max_seq_lengths") or list(DEFAULT_LENGTHS)
    value = [value] if isinstance(value, (int, str)) else list(value)
    try:
        out = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"max_seq_lengths must be integers, got {value!r}.") from None
    bad = [v for v in out if v not in LENGTHS]
    if bad:
        raise ValueError(f"RULER sequence lengths must be powers of two from 256 to 1048576; got {bad}.")
    return out


@lru_cache(maxsize=4)
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    if len(tok("The quick brown fox jumps over the lazy dog.").input_ids) == 0:
        raise ValueError(f"The tokenizer {name} encodes text to no tokens; RULER cannot size its samples.")
    return tok


def tokenizer_from(metadata: dict):
    for key in ("tokenizer", "pretrained"):
        value = metadata.get(key)
        if isinstance(value, str) and value:
            return _tokenizer(value)
    raise ValueError(
        "RULER sizes its samples with the model's tokenizer: pass it as task metadata `tokenizer` or "
        "`pretrained` (lm_eval passes --model_args pretrained=...; engram-hf eval passes the checkpoint)."
    )


def _rng(seed: int, task: str, length: int) -> random.Random:
    return random.Random(zlib.crc32(f"{seed}/{task}/{length}".encode()))


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text).input_ids)


# ----------------------------------------------------------------------------- haystacks
REPEAT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)): 40 insertion depths
SHIPPED_HAYSTACK = "britannica_1911_shakespeare.txt"


def essay_text(data_dir=None) -> tuple[str, str]:
    """The essay haystack and where it came from: the data directory's essays, else the shipped text."""
    if data.has_data(data.RULER_ESSAYS, data_dir):
        rows = data.read_jsonl(data.data_path(data.RULER_ESSAYS, data_dir), ("text",))
        return " ".join(r["text"] for r in rows), "paul_graham_essays"
    text = resources.files(__package__).joinpath("haystack", SHIPPED_HAYSTACK).read_text(encoding="utf-8")
    return text, "shipped public-domain text (differs from upstream RULER)"


@lru_cache(maxsize=2)
def _essay_words(data_dir) -> tuple[tuple[str, ...], str]:
    text, source = essay_text(data_dir)
    return tuple(re.sub(r"\s+", " ", text).strip().split(" ")), source


@lru_cache(maxsize=2)
def _punkt(data_dir):
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    # Punkt learns abbreviations and sentence starters from the text it will split, unsupervised:
    # no pretrained model (nltk's punkt_tab would be a download).
    return PunktSentenceTokenizer(" ".join(_essay_words(data_dir)[0]))


@lru_cache(maxsize=64)
def _sentences(data_dir, n_words: int) -> tuple[str, ...]:
    words = _essay_words(data_dir)[0]
    return tuple(_punkt(data_dir).tokenize(" ".join(words[:n_words]).strip()))


def _words():
    import wonderwords

    categories = wonderwords.RandomWord()._categories  # the package's bundled lists, no network
    return categories


@lru_cache(maxsize=1)
def niah_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    c = _words()
    return tuple(sorted(set(c["adjectives"]))), tuple(sorted(set(c["nouns"])))


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        # An adjective-noun key. Upstream draws from the set of all 6 million pairs, built at import
        # (seconds and hundreds of MB); drawing the two words independently is the same distribution
        # up to the rare pairs that spell the same string.
        adjectives, nouns = niah_words()
        return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"Unknown needle type {kind!r}.")


# ----------------------------------------------------------------------------- needle in a haystack
def _niah_input(
    rng, num_haystack, *, haystack, data_dir, num_needle_k, type_needle_k, num_needle_v, type_needle_v, num_needle_q
):
    keys, values, needles = [], [], []
    for _ in range(num_needle_k):
        keys.append(_random_value(rng, type_needle_k))
        value = []
        for _ in range(num_needle_v):
            value.append(_random_value(rng, type_needle_v))
            needles.append(NEEDLE.format(type_needle_v=type_needle_v, key=keys[-1], value=value[-1]))
        values.append(value)
    random.Random(DEFAULT_SEED).shuffle(needles)  # upstream shuffles needles with a fixed seed

    if haystack == "essay":
        sents = _sentences(data_dir, num_haystack)
        cuts = [0, *sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles))), len(sents)]
        parts = []
        for i in range(1, len(cuts)):
            parts.append(" ".join(sents[cuts[i - 1] : cuts[i]]))
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
        context = " ".join(parts)
    else:
        if haystack == "repeat":
            sentences = [REPEAT_NOISE] * num_haystack
        else:  # "needle": distractor needles with other keys and values
            sentences = [
                NEEDLE.format(
                    type_needle_v=type_needle_v,
                    key=_random_value(rng, type_needle_k),
                    value=_random_value(rng, type_needle_v),
                )
                for _ in range(num_haystack)
            ]
        for index, needle in zip(sorted(rng.sample(range(num_haystack), len(needles)), reverse=True), needles):
            sentences.insert(index, needle)
        context = "\n".join(sentences)

    indices = rng.sample(range(num_needle_k), num_needle_q)
    queries = [keys[i] for i in indices]
    answers = [a for i in indices for a in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, kind = NIAH_TEMPLATE, type_needle_v
    if num_needle_q * num_needle_v == 1:
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        kind = type_needle_v[:-1]
    return template.format(type_needle_v=kind, context=context, query=query), answers, query


def niah_samples(
    task,
    tokenizer,
    rng,
    length,
    n,
    data_dir=None,
    *,
    haystack,
    type_needle_k,
    type_needle_v,
    num_needle_k=1,
    num_needle_v=1,
    num_needle_q=1,
):
    tokens_to_generate = MAX_GEN_TOKS[task]
    num_needle_k = max(num_needle_k, num_needle_q)
    num_needles = num_needle_k * num_needle_v
    if haystack == "essay":
        incremental = 500 if length >= 4096 else 25  # upstream: 500, too coarse below 4k tokens
        total_words = len(_essay_words(data_dir)[0])
    else:
        incremental = 25 if length >= 4096 else 5
        total_words = None
    spec = dict(
        haystack=haystack,
        data_dir=data_dir,
        num_needle_k=num_needle_k,
        type_needle_k=type_needle_k,
        num_needle_v=num_needle_v,
        type_needle_v=type_needle_v,
        num_needle_q=num_needle_q,
    )

    # Grow the haystack until the first sample would not fit, then step back (upstream's sizing).
    num_haystack = max(incremental, num_needles)
    while True:
        text, answer, _ = _niah_input(rng, num_haystack, **spec)
        if _n_tokens(tokenizer, text + " ".join(answer)) + tokens_to_generate > length:
            num_haystack -= incremental
            break
        if total_words is not None and num_haystack >= total_words:
            _, source = _essay_words(data_dir)
            raise ValueError(
                f"{task}: the essay haystack ({source}, {total_words:,} words) is too short to fill {length:,} "
                f"tokens. Put the Paul Graham essays in the data directory ({data.RULER_ESSAYS}, e.g. with "
                "`engram-hf prepare-data --from-hub --benchmarks ruler`) or use a shorter length."
            )
        if num_haystack > length:
            raise ValueError(f"{task}: the tokenizer under-reports lengths; the haystack outgrew {length} units.")
        num_haystack += incremental
    num_haystack = max(num_haystack, num_needles)

    for index in range(n):
        used = num_haystack
        while used > 0:  # shrink until the sample fits
            text, answer, query = _niah_input(rng, used, **spec)
            size = _n_tokens(tokenizer, text) + tokens_to_generate
            if size <= length:
                break
            used -= incremental
        else:
            continue
        single = num_needle_q * num_needle_v == 1
        yield (
            {
                "index": index,
                "input": text,
                "outputs": answer,
                "length": size,
                "max_length": length,
                "gen_prefix": (
                    f"The special magic {type_needle_v[:-1]} for {query} mentioned in the provided text is"
                    if single
                    else f"The special magic {type_needle_v} for {query} mentioned in the provided text are"
                ),
            }
        )


NIAH = {
    "niah_single_1": dict(haystack="repeat", type_needle_k="words", type_needle_v="numbers"),
    "niah_single_2": dict(haystack="essay", type_needle_k="words", type_needle_v="numbers"),
    "niah_single_3": dict(haystack="essay", type_needle_k="words", type_needle_v="uuids"),
    "niah_multikey_1": dict(haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_k=4),
    "niah_multikey_2": dict(haystack="needle", type_needle_k="words", type_needle_v="numbers"),
    "niah_multikey_3": dict(haystack="needle", type_needle_k="uuids", type_needle_v="uuids"),
    "niah_multivalue": dict(haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_v=4),
    "niah_multiquery": dict(haystack="essay", type_needle_k="words", type_needle_v="numbers", num_needle_q=4),
}


# ----------------------------------------------------------------------------- variable tracking
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
    "assgined the value {query}, they are: "
)


def _vt_chains(rng, num_chains, num_hops, is_icl=False):
    k = 3 if is_icl else 5
    num_hops = min(10, num_hops) if is_icl else num_hops
    names = ["".join(rng.choices(string.ascii_uppercase, k=k)) for _ in range((num_hops + 1) * num_chains)]
    while len(set(names)) < num_chains * (num_hops + 1):
        names.append("".join(rng.choices(string.ascii_uppercase, k=k)))
    variables, chains = [], []
    for i in range(0, len(names), num_hops + 1):
        these = names[i : i + num_hops + 1]
        variables.append(these)
        chain = [f"VAR {these[0]} = {rng.randint(10000, 99998)}"]
        chain += [f"VAR {these[j + 1]} = VAR {these[j]} " for j in range(num_hops)]
        chains.append(chain)
    return variables, chains


def _vt_input(rng, num_noises, num_chains=1, num_hops=4, is_icl=False):
    variables, chains = _vt_chains(rng, num_chains, num_hops, is_icl)
    sentences = [REPEAT_NOISE + "\n"] * num_noises
    if len(sentences) <= len(chains[0]):
        sentences = [s + "." if s.strip() else s for noise in sentences for s in noise.split(".")]
        if len(sentences) <= len(chains[0]):
            chains = [c[: len(sentences) - 1] for c in chains]
    for chain in chains:
        positions = sorted(rng.sample(range(len(sentences)), len(chain)))
        for j, pos in enumerate(positions):
            sentences.insert(pos + j, chain[j])
    context = " ".join(sentences).replace(". \n", ".\n")
    value = chains[0][0].split("=")[-1].strip()
    text = VT_TEMPLATE.format(context=context, query=value) + VT_ANSWER_PREFIX.format(num_v=num_hops + 1, query=value)
    return text, variables[0]


def _vt_randomize_icl(rng, example: str) -> str:
    cut = example.index(VT_ANSWER_PREFIX[-10:])
    for item in example[cut + 10 :].strip().split():
        example = example.replace(item, "".join(rng.choices(string.ascii_uppercase, k=len(item))))
    return example


def _vt_generate(tokenizer, rng, length, n, incremental=10, tokens_to_generate=30, icl=None):
    example_tokens = 0
    icl_text = None
    if icl is not None:
        icl_text = icl["input"] + " " + " ".join(icl["outputs"]) + "\n\n"
        example_tokens = _n_tokens(tokenizer, icl_text)
    is_icl = icl is None
    num_noises = incremental
    while True:
        text, answer = _vt_input(rng, num_noises, is_icl=is_icl)
        if _n_tokens(tokenizer, text + f" {answer}") + tokens_to_generate + example_tokens > length:
            num_noises -= incremental
            break
        num_noises += incremental
    num_noises = max(num_noises, 1)
    for index in range(n):
        used = num_noises
        while True:
            text, answer = _vt_input(rng, used, is_icl=is_icl)
            size = _n_tokens(tokenizer, text) + tokens_to_generate + example_tokens
            if size <= length or used <= 1:
                break
            used = max(1, used - incremental)
        if size > length:
            continue
        if icl_text is not None:
            cut = text.index(VT_TEMPLATE[:20])
            text = text[:cut] + _vt_randomize_icl(rng, icl_text) + "\n\n" + text[cut:]
        prefix_at = text.rfind(" Answer: According to the chain(s) of variable assignment")
        gen_prefix = text[prefix_at:].strip()
        if icl is not None:
            text = text[:prefix_at]
        yield (
            {
                "index": index,
                "input": text,
                "outputs": answer,
                "length": size,
                "max_length": length,
                "gen_prefix": gen_prefix,
            }
        )


def vt_samples(task, tokenizer, rng, length, n, data_dir=None):
    icl = next(iter(_vt_generate(tokenizer, rng, 500, 1, incremental=5)), None)
    if icl is None:
        raise ValueError("RULER vt: no in-context example fits 500 tokens.")
    yield from _vt_generate(tokenizer, rng, length, n, icl=icl)


# ----------------------------------------------------------------------------- common words
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"


@lru_cache(maxsize=1)
def cwe_words() -> tuple[str, ...]:
    c = _words()
    words = sorted({w for k in ("noun", "adjective", "verb") for w in c[k]})
    random.Random(DEFAULT_SEED).shuffle(words)
    return tuple(words)


def _cwe_example(rng, num_words, common_repeats, uncommon_repeats, common_nums=10):
    words = rng.sample(cwe_words(), num_words)
    common, uncommon = words[:common_nums], words[common_nums:]
    listing = common * int(common_repeats) + uncommon * int(uncommon_repeats)
    rng.shuffle(listing)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(listing)), common


def _cwe_input(rng, num_words, length):
    if length < 4096:
        ctx_example, ans_example = _cwe_example(rng, 20, 3, 1)
        ctx, answer = _cwe_example(rng, num_words, 6, 1)
    else:
        ctx_example, ans_example = _cwe_example(rng, 40, 10, 3)
        ctx, answer = _cwe_example(rng, num_words, 30, 3)
    template = CWE_TEMPLATE + CWE_ANSWER_PREFIX
    example = template.format(context=ctx_example) + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ans_example))
    return example, template.format(context=ctx), answer


def cwe_samples(task, tokenizer, rng, length, n, data_dir=None, incremental=10):
    tokens_to_generate = MAX_GEN_TOKS[task]
    num_words = incremental
    limit = len(cwe_words())
    while True:
        example, text, answer = _cwe_input(rng, num_words, length)
        listed = " ".join(f"{i + 1}. {w}" for i, w in enumerate(answer))
        if _n_tokens(tokenizer, example + "\n" + text + " " + listed) + tokens_to_generate > length:
            num_words -= incremental
            break
        num_words += incremental
        if num_words > limit:
            num_words = limit
            break
    num_words = max(num_words, 11)
    for index in range(n):
        used = num_words
        while True:
            example, text, answer = _cwe_input(rng, used, length)
            size = _n_tokens(tokenizer, text) + tokens_to_generate
            if size <= length or used <= 11:
                break
            used = max(11, used - incremental)
        if size > length:
            continue
        yield (
            {
                "index": index,
                "input": text[: text.rfind(CWE_ANSWER_PREFIX)].strip(),
                "outputs": answer,
                "length": size,
                "max_length": length,
                "gen_prefix": CWE_ANSWER_PREFIX.strip(),
                "input_example": example,
            }
        )


# ----------------------------------------------------------------------------- frequent words
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"


def _fwe_vocab(rng, vocab_size, coded_wordlen=6):
    vocab = ["".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)) for _ in range(vocab_size)]
    while len(set(vocab)) < vocab_size:
        vocab.append("".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)))
    vocab = sorted(set(vocab))
    random.Random(DEFAULT_SEED).shuffle(vocab)
    vocab[0] = "..."  # the most frequent "word" is noise
    return vocab


def _fwe_text(vocab, num_words, alpha=2.0):
    from scipy.special import zeta

    counts = [int(num_words * (k**-alpha) / zeta(alpha)) for k in range(1, len(vocab) + 1)]
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    random.Random(DEFAULT_SEED).shuffle(words)
    return (FWE_TEMPLATE + FWE_ANSWER_PREFIX).format(context=" ".join(words)), vocab[1:4]


def fwe_samples(task, tokenizer, rng, length, n, data_dir=None, coded_wordlen=6, alpha=2.0):
    vocab_size = length // 50
    incremental = max(1, length // 32)
    budget = length - MAX_GEN_TOKS[task]  # upstream fills the whole length; we leave room for the answer
    # Size on a first vocabulary (upstream's search), then draw a fresh vocabulary per sample.
    vocab = _fwe_vocab(rng, vocab_size, coded_wordlen)
    num_words = budget // coded_wordlen
    text, _ = _fwe_text(vocab, num_words, alpha)
    while _n_tokens(tokenizer, text) < budget:
        num_words += incremental
        text, _ = _fwe_text(vocab, num_words, alpha)
    num_words -= incremental
    for index in range(n):
        vocab = _fwe_vocab(rng, vocab_size, coded_wordlen)
        used = num_words
        text, answer = _fwe_text(vocab, used, alpha)
        while _n_tokens(tokenizer, text) > budget and used > incremental:
            used -= incremental
            text, answer = _fwe_text(vocab, used, alpha)
        size = _n_tokens(tokenizer, text) + MAX_GEN_TOKS[task]
        if size > length:
            continue
        yield (
            {
                "index": index,
                "input": text[: text.rfind(FWE_ANSWER_PREFIX)].strip(),
                "outputs": answer,
                "length": size,
                "max_length": length,
                "gen_prefix": FWE_ANSWER_PREFIX.strip(),
            }
        )


# ----------------------------------------------------------------------------- question answering
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
    "\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on the given documents. "
    "Only give me the answer and do not output any other words.\n\nQuestion: {query}"
)
DOCUMENT = "Document {i}:\n{document}"


def read_squad(path) -> tuple[list[dict], list[str]]:
    raw = data.read_json(path)
    docs = sorted({p["context"] for d in raw["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for d in raw["data"]:
        more = [index[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            for qa in p["qas"]:
                if not qa.get("is_impossible", not qa["answers"]):
                    own = index[p["context"]]
                    qas.append(
                        {
                            "query": qa["question"],
                            "outputs": [a["text"] for a in qa["answers"]],
                            "context": [own],
                            "more_context": [i for i in more if i != own],
                        }
                    )
    return qas, docs


def read_hotpotqa(path) -> tuple[list[dict], list[str]]:
    raw = data.read_json(path)
    docs = sorted({f"{t}\n{''.join(p)}" for d in raw for t, p in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = [
        {
            "query": d["question"],
            "outputs": [d["answer"]],
            "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]],
        }
        for d in raw
    ]
    return qas, docs


def _qa_input(rng, index, num_docs, qas, docs):
    q = qas[index]
    own, more = q["context"], q.get("more_context", [])
    if num_docs < len(docs):
        if num_docs - len(own) > len(more):
            others = [i for i in range(len(docs)) if i not in set(own + more)]
            chosen = own + more + rng.sample(others, max(0, num_docs - len(own) - len(more)))
        else:
            chosen = own + rng.sample(more, max(0, num_docs - len(own)))
        chosen = [docs[i] for i in chosen]
    else:
        chosen = list(docs)
    random.Random(DEFAULT_SEED).shuffle(chosen)
    context = "\n\n".join(DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(chosen))
    return QA_TEMPLATE.format(context=context, query=q["query"]), q["outputs"]


def qa_samples(task, tokenizer, rng, length, n, data_dir=None, incremental=10):
    relpath, reader = (data.SQUAD, read_squad) if task == "qa_squad" else (data.HOTPOTQA, read_hotpotqa)
    qas, docs = reader(data.require(relpath, f"offline_ruler_{task}", data_dir))
    tokens_to_generate = MAX_GEN_TOKS[task]
    num_docs = incremental
    while True:
        text, answer = _qa_input(rng, 0, num_docs, qas, docs)
        if _n_tokens(tokenizer, text + f" {answer}") + tokens_to_generate > length:
            num_docs -= incremental
            break
        num_docs += incremental
        if num_docs > len(docs):
            num_docs = len(docs)
            break
    num_docs = max(num_docs, 1)
    for index in range(min(n, len(qas))):
        floor = len(qas[index]["context"])
        for used in [*range(max(num_docs, floor), floor, -incremental), floor]:
            text, answer = _qa_input(rng, index, used, qas, docs)
            size = _n_tokens(tokenizer, text) + tokens_to_generate
            if size <= length:
                yield (
                    {
                        "index": index,
                        "input": text,
                        "outputs": answer,
                        "length": size,
                        "max_length": length,
                        "gen_prefix": "Answer:",
                    }
                )
                break


# ----------------------------------------------------------------------------- lm-eval entries
def sample_counts(metadata: dict) -> dict[int, int]:
    """Samples to build per length: ``ruler_samples`` (default 500) each. With ``ruler_limit`` (the
    documents lm-eval will read, ``--limit N``) no more than that in all, shared out over the lengths
    in turn, so that a quick run builds only what it reads and still covers every length it can."""
    n = int(metadata.get("ruler_samples") or DEFAULT_SAMPLES)
    lengths = lengths_from(metadata)
    limit = metadata.get("ruler_limit")
    if limit is None:
        return dict.fromkeys(lengths, n)
    each, extra = divmod(int(limit), len(lengths))
    shares = {length: min(n, each + (i < extra)) for i, length in enumerate(lengths)}
    return {length: k for length, k in shares.items() if k > 0}


def samples(task: str, metadata: dict, data_dir=None, progress: bool = True) -> list[dict]:
    """All samples of one RULER task at the lengths and counts the metadata asks for."""
    if task not in TASKS:
        raise ValueError(f"Unknown RULER task {task!r}; expected one of {list(TASKS)}.")
    if task in PART_MATCH:  # the data check comes first: it needs no tokenizer
        data.require(data.SQUAD if task == "qa_squad" else data.HOTPOTQA, f"offline_ruler_{task}", data_dir)
    tokenizer = tokenizer_from(metadata)
    seed = int(metadata.get("ruler_seed", DEFAULT_SEED))
    if task in ESSAY_TASKS:
        log.info("RULER %s haystack: %s", task, _essay_words(data_dir)[1])
    out = []
    for length, n in sample_counts(metadata).items():
        rng = _rng(seed, task, length)
        if task in NIAH:
            generator = niah_samples(task, tokenizer, rng, length, n, data_dir, **NIAH[task])
        else:
            make = {"vt": vt_samples, "cwe": cwe_samples, "fwe": fwe_samples}.get(task, qa_samples)
            generator = make(task, tokenizer, rng, length, n, data_dir)
        batch = list(tqdm(generator, total=n, desc=f"RULER {task} @ {length} tokens", disable=not progress))
        if not batch:
            raise ValueError(f"RULER {task}: no sample fits {length} tokens; use a longer length.")
        if len(batch) < n:
            log.warning("RULER %s at %d tokens: %d of %d samples fit.", task, length, len(batch), n)
        for s in batch:
            missing = [o for o in s["outputs"] if o not in s["input"]]
            if missing and task not in PART_MATCH:
                raise RuntimeError(f"RULER {task}: generated a sample whose answers {missing} are not in its input.")
        out.extend(batch)
    return out


def dataset(ruler_task: str, task: str | None = None, data_dir=None, **metadata):
    """lm-eval ``custom_dataset`` entry."""
    import datasets

    return {"test": datasets.Dataset.from_list(samples(ruler_task, metadata, data_dir))}


def _clean(prediction: str) -> str:
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """Fraction of the references found (case-insensitively) in the prediction."""
    return sum(r.lower() in prediction.lower() for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """1.0 if any reference is found in the prediction (QA: any accepted answer)."""
    return float(any(r.lower() in prediction.lower() for r in references))


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    score = string_match_all(_clean(results[0]), doc["outputs"])
    return {"score": score, str(doc["max_length"]): score}


def process_results_part(doc: dict, results: list[str]) -> dict[str, float]:
    score = string_match_part(_clean(results[0]), doc["outputs"])
    return {"score": score, str(doc["max_length"]): score}
