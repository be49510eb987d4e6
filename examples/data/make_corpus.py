"""Writes examples/data/minilm.jsonl: sentences.jsonl plus training-only sentences.

examples/minilm-cpu.yaml reads minilm.jsonl.

Why: an embedding student (distillation) or a pruned model (fine-tuning) learns from its
teacher's outputs on any text, and 300 training sentences are far too few for it to generalise
to held-out ones. These sentences are written for the project from templates and vocabulary
over the same eight topics as sentences.jsonl (0 tech, 1 sports, 2 food, 3 travel, 4 finance,
5 health, 6 science, 7 entertainment), mixing statements, questions and casual remarks. Every
row carries ``"split": "train"``, so the pipeline uses it for training and calibration only;
the held-out rows stay the hand-written sentences.

The file starts with sentences.jsonl's rows unchanged and in order (so the held-out rows are
exactly the ones a spec on sentences.jsonl holds out), then the generated rows.

    python examples/data/make_corpus.py [--rows 2000] [--seed 0]

Deterministic for a seed; no network, no downloaded text.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
SOURCE = HERE / "sentences.jsonl"
OUT = HERE / "minilm.jsonl"

COMMON = {
    "when": ["yesterday", "last week", "this morning", "on Friday", "after lunch", "every night",
             "since March", "over the weekend", "two days ago", "right now", "later today",
             "at the end of the month", "during the holidays", "before the deadline"],
    "feel": ["surprisingly good", "a bit disappointing", "way better than expected",
             "frustrating", "honestly impressive", "confusing at first", "pretty boring",
             "exciting", "overrated", "worth every penny", "hard to explain", "fantastic"],
    "person": ["my brother", "our neighbor", "a friend from work", "my grandmother",
               "the new intern",
               "my roommate", "our manager", "a colleague", "my sister", "the teacher",
               "my partner", "an old classmate", "the landlord", "my cousin"],
    "ask": ["How do I", "Is it possible to", "What is the best way to",
            "Why does it take so long to",
            "Can someone explain how to", "Should I", "Does anyone know how to",
            "What happens if you"],
    "num": ["two", "three", "five", "ten", "twelve", "twenty", "fifty", "a hundred", "several",
            "a dozen"],
}

TOPICS: dict[int, dict[str, list[str]]] = {
    0: {
        "thing": ["the laptop", "the database", "our API", "the Kubernetes cluster", "the router",
                  "the build server", "the mobile app", "the cache layer", "the CI pipeline",
                  "the load balancer", "my phone", "the graphics card", "the web server",
                  "the Python script", "the backup job", "the message queue", "the SSD",
                  "the firewall", "the login page", "the compiler", "the container image"],
        "act": ["crashed", "ran out of memory", "slowed down", "failed to start", "kept rebooting",
                "timed out", "lost its connection", "threw a permission error",
                "used all the CPU", "stopped responding", "corrupted a file", "leaked memory"],
        "fix": ["restart the service", "update the drivers", "roll back the deployment",
                "clear the cache", "rotate the credentials", "add more replicas",
                "increase the timeout", "rebuild the index", "upgrade the kernel",
                "enable logging", "patch the dependency", "reinstall the package",
                "configure a retry policy", "write a unit test", "profile the hot loop"],
        "spec": ["16 GB of RAM", "an eight-core CPU", "a 1 TB drive", "gigabit ethernet",
                 "a 4K display", "two GPUs", "an ARM processor", "32 GB of memory"],
    },
    1: {
        "thing": ["the team", "the striker", "the goalkeeper", "our coach", "the tennis player",
                  "the marathon runner", "the referee", "the home side", "the cyclist",
                  "the swimmer", "the point guard", "the rookie", "the defense", "the captain"],
        "act": ["won the final", "scored twice", "missed a penalty", "broke the record",
                "lost in overtime", "got injured", "signed a new contract", "trained in the rain",
                "qualified for the playoffs", "dropped a crucial set",
                "came back from two goals down"],
        "fix": ["improve my serve", "run a faster mile", "build stamina", "stretch before a game",
                "learn to swim freestyle", "throw a curveball", "get better at chess",
                "train for a half marathon", "keep the ball low", "defend against a fast break"],
        "spec": ["a thrilling penalty shootout", "a last-minute goal", "a record crowd",
                 "a five-set match", "a photo finish", "a red card in the first half"],
    },
    2: {
        "thing": ["the soup", "this pasta", "the bakery downtown", "the new ramen place",
                  "my sourdough", "the curry", "the salad", "the chocolate cake", "the coffee",
                  "the taco truck", "the roast chicken", "the vegan burger", "grandma's stew",
                  "the sushi bar", "the pancakes"],
        "act": ["tasted too salty", "sold out by noon", "was perfectly crispy",
                "burned on the bottom",
                "came out dense", "smelled amazing", "needed more garlic", "was served cold",
                "was ready in twenty minutes", "got a great review"],
        "fix": ["make fresh pasta", "keep bread from going stale", "cook rice without a cooker",
                "sear a steak", "bake gluten-free cookies", "brew better coffee",
                "thicken a sauce", "pickle vegetables", "marinate tofu", "roast vegetables evenly"],
        "spec": ["fresh basil", "smoked paprika", "brown butter", "a pinch of sea salt",
                 "lots of lemon", "slow-cooked onions", "toasted sesame seeds"],
    },
    3: {
        "thing": ["our flight", "the hotel", "the train to the coast", "the hostel", "the ferry",
                  "the road trip", "the museum pass", "the rental car", "the night bus",
                  "the airport lounge", "our guide", "the cruise", "the mountain village",
                  "the beach resort"],
        "act": ["was delayed", "got canceled", "was overbooked", "had an amazing view",
                "was cheaper than expected", "took six hours", "lost our luggage",
                "included breakfast", "was packed with tourists", "required a visa"],
        "fix": ["find cheap flights", "pack light for two weeks", "avoid jet lag",
                "get a refund for a canceled flight", "travel with a toddler",
                "rent a car abroad", "exchange money", "book a sleeper train",
                "get around without speaking the language", "plan a road trip"],
        "spec": ["a window seat", "a sea view", "free cancellation", "a late checkout",
                 "a two-hour layover", "a rail pass", "a travel insurance policy"],
    },
    4: {
        "thing": ["the stock market", "my savings account", "the central bank", "our mortgage",
                  "the startup", "the index fund", "my credit card", "the quarterly report",
                  "the bond market", "the pension fund", "the exchange rate", "my budget",
                  "the company's revenue", "the tax refund"],
        "act": ["dropped sharply", "rose by four percent", "beat expectations",
                "raised interest rates",
                "missed its targets", "doubled in value", "charged a hidden fee",
                "paid a dividend", "cut costs", "went bankrupt"],
        "fix": ["pay off debt faster", "start investing", "build an emergency fund",
                "file my taxes", "improve my credit score", "save for retirement",
                "negotiate a raise", "refinance a loan", "track monthly spending",
                "diversify a portfolio"],
        "spec": ["a low-fee index fund", "a fixed-rate loan", "a high-yield account",
                 "quarterly dividends", "a balanced portfolio", "inflation above target"],
    },
    5: {
        "thing": ["my knee", "the vaccine", "the doctor", "my sleep", "the new diet",
                  "my blood pressure", "the clinic", "the physical therapist", "my allergy",
                  "the flu", "my back", "the fitness app", "the hospital"],
        "act": ["started hurting again", "improved a lot", "caused mild side effects",
                "got worse at night", "needs a checkup", "went back to normal",
                "recommended more rest", "was fully booked", "kept me awake"],
        "fix": ["sleep better", "lower cholesterol", "recover from a sprain", "reduce stress",
                "drink more water", "stop snoring", "treat a migraine", "build healthy habits",
                "ease joint pain", "boost my immune system"],
        "spec": ["eight hours of sleep", "a daily walk", "less sugar", "more fiber",
                 "regular stretching", "a balanced diet", "plenty of vitamin D"],
    },
    6: {
        "thing": ["the telescope", "the experiment", "the new study", "the rover",
                  "the research team", "the particle accelerator", "the climate model",
                  "the fossil", "the vaccine trial", "the satellite", "the enzyme",
                  "the black hole", "the volcano"],
        "act": ["detected a faint signal", "confirmed the hypothesis", "failed to replicate",
                "measured record temperatures", "found traces of water", "was published",
                "revealed a new species", "changed our understanding", "produced surprising data"],
        "fix": ["measure the speed of light", "explain photosynthesis", "calculate orbital speed",
                "test a hypothesis", "read a scientific paper", "understand quantum tunneling",
                "date a rock sample", "model population growth", "observe a comet"],
        "spec": ["a peer-reviewed paper", "a control group", "a larger sample",
                 "precise measurements", "a double-blind design", "infrared images"],
    },
    7: {
        "thing": ["the movie", "the new album", "the concert", "the TV series", "the video game",
                  "the novel", "the comedy show", "the musical", "the podcast", "the festival",
                  "the band", "the director", "the season finale", "the documentary"],
        "act": ["got great reviews", "was too long", "sold out in minutes", "won an award",
                "had a twist ending", "was canceled", "broke streaming records",
                "dragged in the middle", "made me cry", "was delayed again"],
        "fix": ["get concert tickets", "start a book club", "learn the guitar",
                "find good podcasts", "stream movies in 4K", "write a screenplay",
                "get into anime", "pick a board game", "record a song at home"],
        "spec": ["a great soundtrack", "stunning visuals", "a strong cast", "clever dialogue",
                 "an open world", "a live orchestra", "a surprise cameo"],
    },
}

TEMPLATES = [
    "{thing} {act} {when}.",
    "{When}, {thing} {act}.",
    "{ask} {fix}?",
    "{Person} told me that {thing} {act}.",
    "I think {thing} {act} because nobody planned for it.",
    "Honestly, {thing} was {feel}.",
    "We tried to {fix}, and it was {feel}.",
    "Does anyone else feel that {thing} is {feel}?",
    "The best part was {spec}.",
    "{Thing} {act}, so we had to {fix}.",
    "If you want to {fix}, start with {spec}.",
    "I spent {num} hours trying to {fix} {when}.",
    "Why {thing} {act} is still a mystery to me.",
    "According to {person}, {thing} {act}.",
    "{Thing} with {spec} is {feel}.",
    "Quick tip: {fix} before it gets worse.",
    "{num} people said {thing} {act}.",
    "I can't believe {thing} {act} again!",
    "Is {spec} really worth it?",
    "After {thing} {act}, {person} decided to {fix}.",
]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def sentence(rng: random.Random, topic: int) -> str:
    vocab = {**COMMON, **TOPICS[topic]}
    tmpl = rng.choice(TEMPLATES)

    def fill(m: re.Match[str]) -> str:
        key = m.group(1)
        word = rng.choice(vocab[key.lower()])
        return _cap(word) if key[0].isupper() else word

    return _cap(re.sub(r"\{(\w+)\}", fill, tmpl))


def make(rows: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict[str, object]] = []
    tries = 0
    while len(out) < rows and tries < rows * 50:
        tries += 1
        topic = rng.randrange(len(TOPICS))
        text = sentence(rng, topic)
        if text not in seen:
            seen.add(text)
            out.append({"text": text, "label": topic, "split": "train"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    base = [ln for ln in SOURCE.read_text(encoding="utf-8").splitlines() if ln.strip()]
    known = {json.loads(ln)["text"] for ln in base}
    rows = [r for r in make(args.rows, args.seed) if r["text"] not in known]
    args.out.write_text("".join(ln + "\n" for ln in base)
                        + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(base)} + {len(rows)} training-only rows to {args.out}")


if __name__ == "__main__":
    main()
