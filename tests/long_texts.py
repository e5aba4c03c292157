"""A long text for tests of long facts: deterministic project notes, then the sentence given."""

import random


def long_text(end: str, words: int = 3000, seed: int = 7) -> str:
    """``words`` words of project notes (deterministic), then ``end``."""
    rng = random.Random(seed)
    subj = ["The backend team", "Our designer", "The product manager", "The QA group", "Finance", "Legal"]
    verb = ["reviewed", "discussed", "postponed", "estimated", "refactored", "documented", "benchmarked"]
    obj = ["the billing service", "the onboarding flow", "the quarterly roadmap", "the search ranking",
           "the invoice export", "the login screen", "the deployment pipeline", "the analytics dashboard"]
    tail = ["before the sprint review", "after a long debate", "ahead of the audit", "during the Tuesday sync",
            "because customers asked for it", "despite the tight deadline", "in preparation for the launch"]
    out: list[str] = []
    n = 0
    while n < words:
        s = f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)} {rng.choice(tail)}."
        out.append(s)
        n += len(s.split())
    return " ".join([*out, end])
