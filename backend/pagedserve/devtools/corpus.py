"""Training text for the locally built tokenizers.

`BASE_CORPUS` is a few KB of varied, hand-written text: English prose, code, numbers,
punctuation, runs of spaces and newlines, and multi-byte UTF-8 (accented Latin, Greek,
Chinese, Japanese, emoji). `training_lines()` extends it with seeded pseudo-words so that the
BPE trainer has enough distinct pairs to reach vocabularies of several thousand tokens.
"""

from __future__ import annotations

import random
from typing import List

BASE_CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog was not amused, and neither was the cat.
Once upon a time, in a small village by the sea, there lived an old fisherman and his wife.
Every morning he went out in his little boat; every evening he came back with a few fish.
"Why do you always come back so late?" she asked. "Because the sea is wide," he answered.
It's a truth universally acknowledged that a model in want of a tokenizer must be trained.
We'll meet at 10:30 a.m. on Monday, March 3rd, 2025 -- don't be late!
Q: What is 17 * 23?  A: 391.  Q: And 2^10?  A: 1024.  Pi is about 3.14159265358979.
Prices: $4.99, $12.50, EUR 7,80, 15% off; total = 1,234,567.89 (approx.)
Phone: +1 (555) 010-9999; e-mail: someone@example.com; URL: https://example.org/a/b?c=d&e=f
Lists: apples, oranges, bananas; one, two, three; red/green/blue; yes|no|maybe.
    Indented line with four spaces.
        Eight spaces here, and	a tab,		two tabs.
Trailing spaces   \n\
Trailing tab\t\n\
Multiple     spaces     between     words.


Blank lines above and below.

def fibonacci(n: int) -> int:
    \"\"\"Return the n-th Fibonacci number.\"\"\"
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()


if __name__ == "__main__":
    print(fibonacci(10), [x ** 2 for x in range(5)], {"key": "value", "n": 42})

#include <stdio.h>
int main(int argc, char **argv) {
    for (int i = 0; i < argc; ++i) {
        printf("%d: %s\\n", i, argv[i]);
    }
    return 0;
}

fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); println!("{:?}", v); }
SELECT name, COUNT(*) AS n FROM users WHERE age >= 18 GROUP BY name ORDER BY n DESC;
{"id": 7, "tags": ["a", "b"], "nested": {"ok": true, "value": null, "pi": 3.14}}
<html><body><p class="note">Hello &amp; welcome!</p></body></html>
$ ls -la /usr/local/bin | grep -i python && echo "done" > /tmp/out.txt

Café, naïve, façade, résumé, jalapeño, Ångström, Zürich, São Paulo, Kraków, Dvořák.
Le cœur a ses raisons que la raison ne connaît point. ¿Dónde está la biblioteca? ¡Olé!
Schöne Grüße aus München; die Straße ist lang. Å, Æ, Ø, ß, ü, ö, ä, é, è, ê, ç, ñ.
Ελληνικά: Καλημέρα κόσμε! Η γλώσσα μου έδωσαν ελληνική. α β γ δ ε ζ η θ λ μ π σ ω Ω.
Русский: Привет, мир! Съешь же ещё этих мягких французских булок.
中文：你好，世界！今天天气很好，我们去公园散步吧。人工智能正在改变世界。
日本語：こんにちは世界。東京は大きな都市です。カタカナとひらがなと漢字。
한국어: 안녕하세요, 세계! 오늘은 좋은 날입니다.
Emoji: 😀 😂 🎉 🚀 ❤️ 👍🏽 🇺🇸 🐍 ☕ ✨ — and symbols: ≤ ≥ ≠ ∞ √ ∑ → ← © ® ™ € £ ¥ ° ±.
Math: ∀x ∈ ℝ, x² ≥ 0; ∫₀¹ x dx = ½; e^(iπ) + 1 = 0.
Punctuation!!! Really??? Wait... (parentheses) [brackets] {braces} <angles> 'quotes' "double".
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 65536 3.5e-7 0xFF 0b1010 -273.15 +42
A longer paragraph follows, to give the tokenizer some ordinary English to learn from. Language
models predict the next token given the previous ones. A serving engine batches many requests,
keeps their attention keys and values in a paged cache, and streams the generated text back to
the clients as soon as each new token is decoded. Latency and throughput both matter.
"""

# Syllables for pseudo-words: enough variety that merges keep finding new frequent pairs.
_ONSETS = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v",
           "w", "z", "br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oo", "ou", "y"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "ng", "st", "ck", "nd", "rt"]
_JOINERS = [" ", " ", " ", " ", ", ", ". ", "  ", "_", "-", "\n", "(", ") ", ": "]


def _pseudo_word(rng: random.Random) -> str:
    word = "".join(
        rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
        for _ in range(rng.randint(1, 3))
    )
    r = rng.random()
    if r < 0.1:
        return word.capitalize()
    if r < 0.13:
        return str(rng.randint(0, 99999))
    return word


def training_lines(num_extra_chars: int = 0, seed: int = 1234) -> List[str]:
    """The base corpus lines, repeated a little, plus about `num_extra_chars` of pseudo-words.

    Deterministic for a given (num_extra_chars, seed).
    """
    lines = BASE_CORPUS.splitlines(keepends=True) * 3
    rng = random.Random(seed)
    produced = 0
    while produced < num_extra_chars:
        parts = []
        for _ in range(rng.randint(4, 14)):
            parts.append(_pseudo_word(rng))
            parts.append(rng.choice(_JOINERS))
        line = "".join(parts).strip(" ") + "\n"
        lines.append(line)
        produced += len(line)
    return lines
