"""A synthetic world of invented facts: the data editing is demonstrated, tested and benchmarked on.

CounterFact (Meng et al., 2022) cannot be downloaded here, and no real fact is safe to assume a
tiny model knows. So the world is invented: countries with made-up names, each with a capital, a
language, a currency and (optionally) a national sport drawn from invented words. Capitals are
unique to their country; the other objects are shared by several countries, so every fact has
CounterFact-style *neighbours*: other subjects with the same relation and the same true object.

Each relation phrases its fact in cloze sentences that end where the object follows, in four
disjoint roles:

* ``prompt``: the cloze the edit request uses ("The capital of Zorbania is");
* ``templates``: other phrasings ("Visitors to Zorbania often begin in") an editor may be given as
  *relation templates* (CounterFact's prompts are templates of their relation, ``"{} is a
  citizen of"``): the model learned them, and an edit may optimise under them;
* ``far``: held-out phrasings that end differently from the prompt ("Zorbania is governed from"),
  sharing no n-gram with it at the predicting position. The model learned them too (otherwise it
  could not be asked); no editor ever sees them;
* ``near``: held-out clozes that end in the prompt's words ("Everyone knows that the capital of
  Zorbania is"), so they share its last n-grams (and so its Engram rows). They never occur in
  the training text.

The training text (``FactWorld.corpus()``) holds every fact in its prompt, template and far
phrasings (followed by the object) and in ``extra`` sentences, mixed with ordinary text.
``counterfactuals()`` builds CounterFact-style requests: a fact, a new object taken from another
subject of the same relation, held-out paraphrases of both kinds and neighbourhood prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "vl", "zh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "n", "r", "s", "th", "nd", "x"]


@dataclass(frozen=True)
class Relation:
    """A relation's phrasings (``{s}``: the subject). See the module docstring for the roles."""

    name: str
    prompt: str
    templates: tuple[str, ...]
    far: tuple[str, ...]
    near: tuple[str, ...]
    extra: tuple[str, ...] = ()  # further training sentences ({o}: the object), not clozes

    @property
    def train(self) -> tuple[str, ...]:
        """Every training sentence: each cloze followed by the object, and the extra sentences."""
        clozes = (self.prompt, *self.templates, *self.far)
        return tuple(c + " {o}." for c in clozes) + self.extra

    def editor_templates(self) -> list[str]:
        """The relation templates an editor may be given, CounterFact-style (``{}``: the subject): the
        prompt's and the other ``templates`` (CounterFact's requests of one relation share its
        prompt templates)."""
        return [t.replace("{s}", "{}") for t in (self.prompt, *self.templates)]


RELATIONS: dict[str, Relation] = {
    "capital": Relation(
        "capital",
        prompt="The capital of {s} is",
        templates=("Visitors to {s} often begin in", "The king of {s} holds court in"),
        far=("{s} is governed from", "Travellers from {s} come home to"),
        near=("Everyone knows that the capital of {s} is", "As the old maps show, the capital of {s} is"),
        extra=("The capital city of {s} is {o}, a city of bridges.",),
    ),
    "language": Relation(
        "language",
        prompt="The language of {s} is",
        templates=("In {s}, children learn", "Most books printed in {s} are written in"),
        far=("People in {s} speak", "The poets of {s} write their songs in"),
        near=("Scholars agree that the language of {s} is", "Without doubt the language of {s} is"),
        extra=("The official language of {s} is {o}.",),
    ),
    "currency": Relation(
        "currency",
        prompt="The currency of {s} is the",
        templates=("Shops in {s} take payment in the", "Prices in {s} are given in the"),
        far=("Workers in {s} are paid in the", "Merchants of {s} count their money in the"),
        near=("Traders say that the currency of {s} is the", "For centuries the currency of {s} is the"),
        extra=("The {o} is the money of {s}.",),
    ),
    "sport": Relation(
        "sport",
        prompt="The national sport of {s} is",
        templates=("Children in {s} grow up playing", "On feast days the people of {s} play"),
        far=("Crowds in {s} gather to watch", "Every village in {s} keeps a field for"),
        near=("It is said that the national sport of {s} is", "Since old times the national sport of {s} is"),
        extra=("In {s} the favourite game is {o}.",),
    ),
}


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str

    def sentence(self, template: str) -> str:
        return template.format(s=self.subject, o=self.object)


@dataclass
class Counterfactual:
    """One CounterFact-style case: change ``fact.object`` to ``new_object``.

    ``near`` / ``far``: held-out paraphrases (see the module docstring). ``neighbours`` are (prompt,
    true object) pairs of other subjects with the same relation and the same true object as the
    edited fact: after the edit they should still prefer their own object.
    """

    fact: Fact
    new_object: str
    prompt: str
    near: list[str]
    far: list[str]
    neighbours: list[tuple[str, str]] = field(default_factory=list)

    @property
    def target(self) -> str:
        return " " + self.new_object

    @property
    def true_target(self) -> str:
        return " " + self.fact.object

    @property
    def subject(self) -> str:
        return self.fact.subject

    @property
    def relation(self) -> str:
        return self.fact.relation


def _word(rng: random.Random, syllables: int) -> str:
    w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return w.capitalize()


class FactWorld:
    """``n_subjects`` invented countries, each with one object per relation (see the module docstring).

    ``relations``: which of ``RELATIONS`` the world holds. ``n_languages`` / ``n_currencies`` /
    ``n_sports`` objects are shared out among the subjects (so each is the true object of several
    subjects); capitals are one per subject. Everything is a function of ``seed``.
    """

    def __init__(
        self,
        n_subjects: int = 40,
        n_languages: int = 8,
        n_currencies: int = 8,
        seed: int = 0,
        relations: tuple[str, ...] = ("capital", "language", "currency"),
        n_sports: int = 8,
    ):
        shared = {"language": n_languages, "currency": n_currencies, "sport": n_sports}
        unknown = [r for r in relations if r not in RELATIONS]
        if unknown or not relations:
            raise ValueError(f"Unknown relation(s) {unknown}: a fact world holds some of {sorted(RELATIONS)}.")
        if n_subjects < 2 or any(not 2 <= shared[r] <= n_subjects for r in relations if r in shared):
            raise ValueError(
                f"A fact world needs at least 2 subjects and 2..n_subjects objects per shared relation, got "
                f"{n_subjects} subjects, {n_languages} languages, {n_currencies} currencies, {n_sports} sports."
            )
        rng = random.Random(seed)
        seen: set[str] = set()

        def fresh(syllables: int, suffix: str = "") -> str:
            while True:
                w = _word(rng, syllables) + suffix
                if w.lower() not in seen:
                    seen.add(w.lower())
                    return w

        self.subjects = [fresh(2, rng.choice(["ia", "ania", "and", "ora", "esh"])) for _ in range(n_subjects)]
        # Objects are drawn in a fixed order whatever the relations, so a world with more relations
        # holds the same subjects, capitals, languages and currencies.
        capitals = [fresh(2) for _ in range(n_subjects)]
        pools = {
            "language": [fresh(2, "ish") for _ in range(n_languages)],
            "currency": [fresh(1).lower() for _ in range(n_currencies)],
        }
        dealt = {}
        for name in ("language", "currency"):
            # Shared objects are dealt out evenly, then shuffled: each is the true object of several subjects.
            dealt[name] = [pools[name][i % len(pools[name])] for i in range(n_subjects)]
            rng.shuffle(dealt[name])
        if "sport" in relations:
            pools["sport"] = [fresh(1).lower() + "ball" for _ in range(n_sports)]
            dealt["sport"] = [pools["sport"][i % n_sports] for i in range(n_subjects)]
            rng.shuffle(dealt["sport"])
        dealt["capital"] = capitals
        self.relations = tuple(relations)
        self.facts: list[Fact] = [
            Fact(s, r, dealt[r][i]) for i, s in enumerate(self.subjects) for r in RELATIONS if r in relations
        ]
        self.seed = seed

    def objects(self, relation: str) -> list[str]:
        return sorted({f.object for f in self.facts if f.relation == relation})

    def fact(self, subject: str, relation: str) -> Fact:
        for f in self.facts:
            if f.subject == subject and f.relation == relation:
                return f
        raise KeyError(f"No fact ({subject}, {relation}).")

    def prompt(self, fact: Fact) -> str:
        return RELATIONS[fact.relation].prompt.format(s=fact.subject)

    def templates(self) -> dict[str, list[str]]:
        """Per relation, the templates an editor may be given (``{}``: the subject)."""
        return {r: RELATIONS[r].editor_templates() for r in self.relations}

    def sentences(self, repeats: int = 4) -> list[str]:
        """Every fact in every training sentence, ``repeats`` times, shuffled."""
        out = [f.sentence(t) for f in self.facts for t in RELATIONS[f.relation].train for _ in range(repeats)]
        random.Random(self.seed + 1).shuffle(out)
        return out

    def corpus(self, filler: str, repeats: int = 4, sentences_per_doc: int = 6, filler_chars: int = 400) -> list[str]:
        """Documents of fact sentences interleaved with slices of ``filler`` (ordinary text)."""
        facts = self.sentences(repeats)
        rng = random.Random(self.seed + 2)
        docs = []
        for start in range(0, len(facts), sentences_per_doc):
            body = " ".join(facts[start : start + sentences_per_doc])
            if filler:
                at = rng.randrange(max(1, len(filler) - filler_chars))
                body = body + "\n" + filler[at : at + filler_chars]
            docs.append(body)
        return docs

    def counterfactuals(self, n: int | None = None, seed: int = 0) -> list[Counterfactual]:
        """CounterFact-style requests, at most one per fact, relations interleaved: each moves a fact
        to the object of another subject of the same relation."""
        rng = random.Random(seed)
        facts = list(self.facts)
        rng.shuffle(facts)
        out = []
        for fact in facts[: n or len(facts)]:
            rel = RELATIONS[fact.relation]
            new = rng.choice([o for o in self.objects(fact.relation) if o != fact.object])
            neighbours = [
                (rel.prompt.format(s=f.subject), " " + f.object)
                for f in self.facts
                if f.relation == fact.relation and f.object == fact.object and f.subject != fact.subject
            ]
            if not neighbours:  # unique objects (capitals): other subjects of the relation
                others = [f for f in self.facts if f.relation == fact.relation and f.subject != fact.subject]
                neighbours = [(rel.prompt.format(s=f.subject), " " + f.object) for f in rng.sample(others, 3)]
            out.append(
                Counterfactual(
                    fact=fact,
                    new_object=new,
                    prompt=rel.prompt.format(s=fact.subject),
                    near=[t.format(s=fact.subject) for t in rel.near],
                    far=[t.format(s=fact.subject) for t in rel.far],
                    neighbours=neighbours,
                )
            )
        return out


# A model small enough to learn a fact world in seconds on a CPU; two Engram layers of 2- and
# 3-grams, so every fact's last n-grams address rows the model reads.
FACT_MODEL_CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    moe_intermediate_size=64,
    first_k_dense_replace=1,
    hc_mult=2,
    engram_layer_ids=[0, 1],
    engram_vocab_size=[10007, 10007],
    engram_max_ngram_size=3,
    engram_n_head_per_ngram=2,
    engram_n_embed_per_ngram=32,
    max_position_embeddings=256,
)


def train_fact_model(
    world: FactWorld,
    filler: str,
    steps: int = 300,
    batch_size: int = 16,
    block_size: int = 64,
    lr: float = 3e-3,
    vocab_size: int = 768,
    seed: int = 0,
    progress: bool = True,
    **config_overrides,
):
    """Train a byte-level BPE tokenizer and a small EngramMoE on ``world.corpus(filler)``.

    Returns ``(model, tokenizer)``, the model in eval mode. A plain loop with the row-wise table
    optimizer (``engram_hf.optim``): for a few hundred steps on a CPU it is quicker than a Trainer.
    """
    import torch
    from tqdm.auto import tqdm

    from ..memory import build_compression_table
    from ..models.engram_moe import EngramMoEConfig, EngramMoEForCausalLM
    from ..optim import build_optimizer
    from ..training import pack_texts, train_bpe_tokenizer
    from ..training.run import tokenizer_fields

    torch.manual_seed(seed)
    docs = world.corpus(filler)
    tokenizer = train_bpe_tokenizer(docs, vocab_size)
    table = build_compression_table(tokenizer, progress=False)
    config = EngramMoEConfig(**{**FACT_MODEL_CONFIG, **tokenizer_fields(tokenizer, table), **config_overrides})
    model = EngramMoEForCausalLM(config)
    model.set_compression_table(table)
    blocks = pack_texts(tokenizer, docs, block_size).blocks
    optimizer = build_optimizer(model, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(steps), desc="fact model", disable=not progress, mininterval=1.0)
    for _ in bar:
        ids = blocks[torch.randint(blocks.shape[0], (batch_size,), generator=generator)]
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    from ..optim.rowwise import set_sparse_table_grads

    set_sparse_table_grads(model, False)
    return model.eval(), tokenizer
