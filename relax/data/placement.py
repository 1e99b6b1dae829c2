"""Where the relay's calls land in the synthetic task's solutions (`relax.data.synthetic`).

The task's hard steps are its prices: world knowledge the student may not have. A call
placed well starts right before one, so the LLM writes the price. `call_placement`
counts, over a relay's eval records, the honoured commands that do. It reads the
solution format of `relax.data.synthetic` (`PRICE`) and nothing of the models.
"""

import re

COMMAND = re.compile(r"<call>\s*\d+\s*</call>")

PRICE = re.compile(r"(?:^|(?<=\. )|(?<=for ))\d+(?=\. )")
"""A price in a solution (the hard step): a number followed by ". " that opens the text,
follows ". " (the prices-first layout) or follows "for " (inline: "Second: bivo for 37. ");
a sum opens "9+4:", a total follows "So ", a carry follows "carry ", a gain ends "more"."""


def call_placement(records, tokenizer, within=2):
    """Where the relay's honoured commands land relative to the hard steps (the prices).

    The SLM keeps its commands in its own text, so they are visible in the response;
    a record's first `calls` commands are the honoured ones. A command is at a hard
    step when the next price in the response (commands removed) starts at most
    `within` tokens after it: the LLM is then asked to write the price. Returns the
    counts and the share."""
    total = near = 0
    for r in records:
        text, pieces, at = r["response"], [], []
        last = 0
        for m in COMMAND.finditer(text):
            pieces.append(text[last : m.start()])
            at.append(sum(map(len, pieces)))  # the command's place in the stripped text
            last = m.end()
        stripped = "".join(pieces) + text[last:]
        starts = [m.start() for m in PRICE.finditer(stripped)]
        for i in at[: r["calls"]]:
            total += 1
            nxt = next((j for j in starts if j >= i), None)
            if nxt is not None:
                gap = tokenizer(stripped[i:nxt], add_special_tokens=False)["input_ids"]
                near += len(gap) <= within
    return {
        "commands": total,
        "at_hard_step": near,
        "within_tokens": within,
        "share": near / total if total else None,
    }
