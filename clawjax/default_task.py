"""The default task: a tiny policy learns a user's hidden answer-format preference online.

The simulated user (`clawjax.rollout.envs.homework`, preference "explain") asks single-digit
additions and is satisfied only by a right answer written as an equation ("3 + 4 = 7"); a bare
"7" gets "The number is right, but that is not what I asked. Please show the working as an
equation before the final number." The preference is never stated in the prompts.

So that both signals carry information for a tiny model (DESIGN.md, "The default task"):
- Binary RL: the warm-start data answers plain prompts with the equation form only
  `explain_share` of the time, so at temperature 1 the policy sometimes satisfies the user
  (+1) and often does not (−1).
- OPD: the warm-start data also holds prompts with a hint appended exactly as the teacher
  context appends it (`HINT_SEPARATOR + hint`) and answers that follow it, so the same tiny
  model, given the hint, answers differently (better): distillation moves that behaviour into
  the policy without the hint.
- Held-out prompts (a fixed share of (template, a, b) triples) are never trained on, neither in
  the warm start nor online; the held-out judged score is the learning curve.
- With the regression gate on, `split_probe` sets a few training prompts aside as its probe:
  the warm start saw them, the online loop never rolls them out.
"""

from __future__ import annotations

import random

from clawjax.rollout.envs import homework

HINT_SEPARATOR = "\n\n[user's hint / instruction]\n"
PREFERENCE = "explain"
TEMPLATES = ("What is {a} + {b}?", "Compute {a} + {b}.", "How much is {a} plus {b}?")
DIGITS = range(1, 10)


def task(template: int, a: int, b: int) -> dict:
    """A homework task dict for `template` (an index of TEMPLATES) and the addends a, b."""
    return {"env": "homework", "task_id": f"add-{template}-{a}-{b}",
            "question": TEMPLATES[template].format(a=a, b=b), "answer": a + b,
            "addends": [a, b], "preference": PREFERENCE, "max_attempts": 1}


def split_tasks(heldout_share: float = 0.1, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train tasks, held-out tasks): every (template, a, b) triple, a seeded held-out share.

    Each held-out triple's fact (a + b) still appears in training under other templates, so
    the held-out score measures the learned preference, not unseen arithmetic.
    """
    triples = [(t, a, b) for t in range(len(TEMPLATES)) for a in DIGITS for b in DIGITS]
    rng = random.Random(seed)
    rng.shuffle(triples)
    n_heldout = max(1, int(len(triples) * heldout_share))
    heldout = sorted(triples[:n_heldout])
    train = sorted(triples[n_heldout:])
    return [task(*t) for t in train], [task(*t) for t in heldout]


def split_probe(tasks: list[dict], n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(rollout tasks, probe tasks): a seeded `n` of `tasks` set aside for the regression
    gate's probe, so the gate scores each candidate on prompts the online loop never trains
    on. Both lists keep `tasks`' order; together they are exactly `tasks`."""
    if not 1 <= n < len(tasks):
        raise ValueError(f"probe size n = {n}, expected between 1 and {len(tasks) - 1} (the "
                         f"{len(tasks)} training tasks must keep at least one for rollouts)")
    picked = set(random.Random(seed).sample(range(len(tasks)), n))
    return ([t for i, t in enumerate(tasks) if i not in picked],
            [t for i, t in enumerate(tasks) if i in picked])


def first_message(task_dict: dict) -> str:
    """What the simulated user says first (exactly the environment's opening observation)."""
    return homework.HomeworkEnv().reset(task_dict).text


def answer(task_dict: dict, form: str) -> str:
    """The right answer in `form`: "explain" ("3 + 4 = 7") or "final_only" ("7")."""
    a, b = task_dict["addends"]
    total = task_dict["answer"]
    return f"{a} + {b} = {total}" if form == "explain" else f"{total}"


def warmstart_examples(tasks: list[dict], n: int, explain_share: float = 0.25,
                       hinted_share: float = 0.4, seed: int = 0) -> list[tuple[list[dict], str]]:
    """`n` (messages, answer) pairs for the supervised warm start.

    Plain prompts get the equation form with probability `explain_share`, else the bare
    number. A `hinted_share` of prompts carry a hint appended to the user message exactly as
    the teacher context does: the preference hint → always the equation form; the
    double-check hint (a correction about arithmetic) → the plain mixture, so it carries no
    format information.
    """
    rng = random.Random(seed)
    double_check = "Please work through it step by step."
    out = []
    for _ in range(n):
        t = rng.choice(tasks)
        content = first_message(t)
        form = "explain" if rng.random() < explain_share else "final_only"
        if rng.random() < hinted_share:
            if rng.random() < 0.75:
                content += HINT_SEPARATOR + homework.HINT_EXPLAIN
                form = "explain"
            else:
                content += HINT_SEPARATOR + double_check
        out.append(([{"role": "user", "content": content}], answer(t, form)))
    return out
