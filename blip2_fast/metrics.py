"""Stage-2 output metrics as LAVIS reports them: COCO caption BLEU / CIDEr-D and VQAv2 accuracy.

Captions follow the COCO caption evaluation (pycocoevalcap, which LAVIS calls):

- BLEU-1..4 is corpus BLEU: clipped n-gram matches and candidate n-gram counts
  are summed over all images before the geometric mean, and the brevity penalty
  compares the total candidate length with the sum, over images, of the
  reference length closest to each candidate (ties go to the shorter
  reference). pycocoevalcap adds 1e-15 to every numerator and 1e-9 to every
  denominator so an empty corpus does not divide by zero; that is kept, so the
  figures match to the last few ulps.
- CIDEr is CIDEr-D (pycocoevalcap's ``Cider`` class): tf-idf vectors of 1..4-grams
  with document frequencies counted over the references of the evaluated set
  (an n-gram counts once per image) and log(number of images) as the idf
  numerator; the candidate's weights are clipped at the reference's, every
  cosine is multiplied by a gaussian length penalty exp(-delta^2 / (2 * 6^2)),
  orders are averaged, references are averaged, and the result is scaled by 10.
  Values are raw (a good model scores about 1.2, LAVIS prints 120).

``coco_tokenize`` replaces the Java step of that pipeline (Stanford PTBTokenizer
3.4.1 with ``-preserveLines -lowerCase``, then dropping pycocoevalcap's
punctuation tokens) for ordinary captions: lowercase; punctuation split off and
dropped; clitics split as PTB does ("don't" -> "do n't", "can't" -> "ca n't",
"it's" -> "it 's", also 'm 're 've 'll 'd); "cannot", "gonna", "gotta", "wanna",
"lemme", "gimme" and "y'..." split the PTB way; hyphenated words, numbers with
"," "." ":" between digits, acronyms ("u.s.", "p.m."), single letters ("b.") and
the common abbreviations ("mr.", "st.", "etc.", months) keep their period.
Brackets come out as "-lrb-" "-rrb-" "-lsb-" "-rsb-" "-lcb-" "-rcb-" and stay in
the caption: Java lowercases its "-LRB-" tokens and pycocoevalcap's list only
holds the upper-case forms. Runs like "!!" or "?!" are one token and stay, as in
Java. Curly quotes, en/em dashes and the ellipsis character are read as their
ASCII forms.

Known differences from Java, all on rarer input (checked against the 3.4.1 jar):
a single capital letter with a period before a capitalised word ("plan B. Then")
keeps its period here ("b."), Java splits it off; the abbreviation list is a
subset of Java's; "no." keeps its period only before a number written apart
("no. 5", not "no.5"); a decimal glued to letters ("1.5x") stays one token where
Java writes "1.5 x"; "@home", "c++", "hi!bye" are split at the symbol here and
kept whole by Java; "rock'n'roll" stays one token (Java: "rock 'n' roll") and
"'tis" loses its apostrophe (Java: "'t is"); doubled apostrophes inside a word
("dog''s") are not read as a closing quote; currency signs are not normalised
(Java writes "£" as "#" and "€" as "$"); Java's wider context rules for
sentence-final periods and its handling of unusual Unicode are not modelled.

VQA accuracy follows the official VQAv2 evaluation script (LAVIS' ``VQAEval``):
the prediction is normalised (``normalize_vqa_answer``, which carries the
common entries of the script's contraction map, not all of them); the human answers are
compared as stored, and only when they disagree among themselves do they get
the script's punctuation step (no lowercasing, digits or articles): VQAv2 stores
its answers already normalised and the script relies on that. A question's
accuracy is the mean, over its answers, of min(1, matches / 3) where matches
counts the prediction among the other answers (the 10 leave-one-out subsets of
the 10 VQAv2 answers).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

__all__ = ["caption_scores", "coco_tokenize", "normalize_vqa_answer", "vqa_accuracy"]

# ---------------------------------------------------------------- COCO tokenizer

# pycocoevalcap drops these tokens after tokenizing. The bracket names are upper case
# here but lower case in the tokenizer's output, so brackets survive: kept as is on purpose.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_CHAR_MAP = str.maketrans(
    {
        "\u2018": "`",  # left single quote: an opening quote
        "\u2019": "'",  # right single quote: an apostrophe or a closing quote
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": " -- ",  # en dash
        "\u2014": " -- ",  # em dash
        "\u2026": " ... ",  # ellipsis character
    }
)
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}

_LETTER = r"[^\W\d_]"
_ALNUM = r"[^\W_]"
# A word: letters and digits, joined inside by "-", ".", "/", by "," or ":" between digits
# ("1,000", "3:30") and by an apostrophe between letters ("don't", "o'clock"). A "-" right
# before a digit at the start of a word is a sign ("-5").
_WORD = (
    rf"(?:(?<!\S)-(?=\d))?{_ALNUM}+"
    rf"(?:(?:[-./]|(?<=\d)[,:](?=\d)|(?<={_LETTER})'(?={_LETTER})){_ALNUM}+)*"
)
_TOKEN = re.compile(
    "|".join(
        [
            r"(?P<bracket>-[lr][rcs]b-|[()\[\]{}])",  # already-tokenized "-lrb-" stays one token
            r"(?P<ellipsis>\.(?:\s*\.){2,})",  # "...", "....", ". . ." are one ellipsis in PTB
            r"(?P<bang>[!?]+)",
            r"(?P<dashes>-{2,})",
            rf"(?P<apos_word>'(?:\d\ds|em|n')(?!{_ALNUM}))",  # "'90s", "'em", "rock 'n' roll" keep their apostrophes
            rf"(?P<clitic>'(?:s|m|d|re|ve|ll)(?!{_ALNUM}))",  # a clitic written apart: "it 's", "90's"
            rf"(?P<word>{_WORD})",
            r"(?P<other>\S)",
        ]
    )
)
_ACRONYM = re.compile(rf"(?:{_LETTER}\.)+{_LETTER}")  # "u.s" before its last period
_NUMBER_AHEAD = re.compile(r"\s*\d")
# Words whose following period PTB keeps attached, in lower case (a subset of Java's lists).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc inc co corp ltd mt ave rd blvd ft est dept univ bros "
    "gen col capt lt sgt gov sen rep rev hon jan feb mar apr jun jul aug sep sept oct nov dec "
    "mon tue wed thu fri".split()
)
_WHOLE_WORD_SPLITS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "lemme": ("lem", "me"),
    "gimme": ("gim", "me"),
}
_CLITIC_TAIL = re.compile(r"(.+)('(?:s|m|d|re|ve|ll))")


def _split_clitics(word: str) -> list[str]:
    if word in _WHOLE_WORD_SPLITS:
        return list(_WHOLE_WORD_SPLITS[word])
    if word.startswith("y'") and len(word) > 2:  # "y'know" -> y' know
        return ["y'", *_split_clitics(word[2:])]
    if "'" not in word:
        return [word]
    tails: list[str] = []
    while True:  # "shouldn't've" -> should n't 've: peel clitics off the end
        if len(word) > 3 and word.endswith("n't"):
            word, tail = word[:-3], "n't"
        elif m := _CLITIC_TAIL.fullmatch(word):
            word, tail = m.group(1), m.group(2)
        else:
            break
        tails.append(tail)
    return [word, *reversed(tails)]


def _keeps_period(word: str, text: str, after: int) -> bool:
    """Whether the period at text[after] belongs to ``word`` (an abbreviation) rather than ending a sentence."""
    if text.startswith("..", after):  # an ellipsis follows
        return False
    if (len(word) == 1 and word.isalpha()) or word in _ABBREVIATIONS or _ACRONYM.fullmatch(word):
        return True
    return word == "no" and _NUMBER_AHEAD.match(text, after + 1) is not None


def coco_tokenize(text: str) -> str:
    """One caption as COCO's PTBTokenizer pipeline leaves it: lower case, tokens joined by single spaces.

    text: any caption; "A dog's toy, isn't it?" -> "a dog 's toy is n't it". The
    module docstring lists where this differs from the Java tokenizer.
    """
    text = text.translate(_CHAR_MAP).lower()
    tokens: list[str] = []
    pos = 0
    while m := _TOKEN.search(text, pos):
        kind, tok = m.lastgroup, m.group()
        pos = m.end()
        if kind == "bracket":
            tokens.append(_BRACKETS.get(tok, tok))
        elif kind == "ellipsis":
            tokens.append("...")
        elif kind == "dashes":
            tokens.append("--")
        elif kind == "word":
            if text.startswith(".", pos) and _keeps_period(tok, text, pos):
                tok += "."
                pos += 1
            tokens.extend(_split_clitics(tok))
        elif tok == '"':
            tokens.append("''")  # PTB turns it into `` or '', both dropped
        else:
            tokens.append(tok)
    return " ".join(t for t in tokens if t not in PTB_PUNCTUATION)


# ---------------------------------------------------------------- caption metrics

_BLEU_TINY, _BLEU_SMALL = 1e-15, 1e-9  # pycocoevalcap's guards against 0 / 0, kept for exact parity
CIDER_N, CIDER_SIGMA = 4, 6.0


def _few(keys: list[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _matched_keys(predictions: Mapping[Hashable, Any], targets: Mapping[Hashable, Any], what: str) -> list[Hashable]:
    """The keys in ``targets`` order, after checking both mappings hold exactly the same ones."""
    missing = [k for k in targets if k not in predictions]
    extra = [k for k in predictions if k not in targets]
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"no prediction for {len(missing)} key(s) of the {what}: {_few(missing)}")
        if extra:
            problems.append(f"{len(extra)} prediction key(s) not in the {what}: {_few(extra)}")
        raise ValueError("predictions and " + what + " must have the same keys; " + "; ".join(problems))
    if not targets:
        raise ValueError("nothing to score: predictions and " + what + " are empty")
    return list(targets)


def _text_list(value: Any, key: Hashable, what: str) -> list[str]:
    # A bare string is a sequence too: iterating it would score characters as references.
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"{what} of key {key!r} must be a sequence of strings, got {type(value).__name__}")
    if not value:
        raise ValueError(f"key {key!r} has no {what}")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"{what} of key {key!r} must be strings, got {type(item).__name__}")
    return list(value)


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _bleu(cands: list[list[str]], refs: list[list[list[str]]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n: cands[i] the tokens of image i's prediction, refs[i] its references' tokens."""
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for cand, image_refs in zip(cands, refs, strict=True):
        max_ref: Counter[tuple[str, ...]] = Counter()
        for ref in image_refs:
            max_ref |= _ngrams(ref, n)  # | keeps the max count of each n-gram
        for gram, count in _ngrams(cand, n).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for k in range(n):
            guess[k] += max(0, len(cand) - k)
        test_len += len(cand)
        ref_len += min((len(r) for r in image_refs), key=lambda length: (abs(length - len(cand)), length))
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + _BLEU_TINY) / (guess[k] + _BLEU_SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
    if ratio < 1:  # brevity penalty, on the corpus totals
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _cider_d(
    cands: list[list[str]], refs: list[list[list[str]]], n: int = CIDER_N, sigma: float = CIDER_SIGMA
) -> float:
    """Corpus CIDEr-D, the mean of the per-image scores; arguments as for ``_bleu``."""
    cand_grams = [_ngrams(c, n) for c in cands]
    ref_grams = [[_ngrams(r, n) for r in image_refs] for image_refs in refs]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for image_refs in ref_grams:
        doc_freq.update({gram for grams in image_refs for gram in grams})
    log_images = math.log(len(refs))

    def tfidf(grams: Counter) -> tuple[list[dict], list[float]]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        for gram, tf in grams.items():
            # An n-gram no reference has gets df 1, i.e. the full idf: it costs norm, earns nothing.
            vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, doc_freq[gram])))
        return vec, [math.sqrt(sum(w * w for w in v.values())) for v in vec]

    total = 0.0
    for cand, grams, image_ref_grams, image_refs in zip(cands, cand_grams, ref_grams, refs, strict=True):
        vec, norm = tfidf(grams)
        per_order = [0.0] * n
        for ref, ref_grams_one in zip(image_refs, image_ref_grams, strict=True):
            ref_vec, ref_norm = tfidf(ref_grams_one)
            # pycocoevalcap measures the length gap in bigrams; for two non-empty sentences that is the
            # gap in words, and with an empty one every cosine is 0 anyway.
            penalty = math.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(w, ref_vec[k].get(g, 0.0)) * ref_vec[k].get(g, 0.0) for g, w in vec[k].items())
                if norm[k] != 0 and ref_norm[k] != 0:
                    dot /= norm[k] * ref_norm[k]
                per_order[k] += dot * penalty
        total += 10.0 * sum(per_order) / n / len(image_refs)
    return total / len(cands)


def caption_scores(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], *, tokenize: bool = True
) -> dict[str, float]:
    """COCO caption metrics of one caption per image.

    predictions: image key -> the generated caption ("" allowed: it scores 0 and
    still counts in the brevity penalty). references: the same keys -> one or
    more human captions. tokenize: run ``coco_tokenize`` on both sides first;
    False when they are already tokenized (then split on whitespace only).
    Returns ``bleu_1`` .. ``bleu_4`` and ``cider`` as raw values (CIDEr ~1.2, not 120).
    """
    keys = _matched_keys(predictions, references, "references")
    prep = coco_tokenize if tokenize else (lambda s: s)
    cands, refs = [], []
    for key in keys:
        pred = predictions[key]
        if not isinstance(pred, str):
            raise TypeError(f"prediction of key {key!r} must be a string, got {type(pred).__name__}")
        cands.append(prep(pred).split())
        refs.append([prep(r).split() for r in _text_list(references[key], key, "references")])
    bleu = _bleu(cands, refs)
    return {**{f"bleu_{k + 1}": b for k, b in enumerate(bleu)}, "cider": _cider_d(cands, refs)}


# ---------------------------------------------------------------- VQA accuracy

# The official script's punctuation list (LAVIS' copy too): no ":", "'", "." (periods have their own rule) or
# "*", so "8:00" and "don't" stay whole while "t-shirt" becomes "t shirt" and "yes!" "yes".
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern reads "(?!<=\d)(\.)(?!\d)": its first group is a lookahead for the text "<=" and a
# digit, never there at a period, so in effect every period not followed by a digit goes ("3.5" stays).
_PERIOD = re.compile(r"\.(?!\d)")
_VQA_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_VQA_ARTICLES = frozenset({"a", "an", "the"})
# A subset of the official contraction map: the common ones. Its values are written as the official
# map writes them, mostly with the typographic apostrophe U+2019 (a few use "'"); that is what the stored
# answers hold, so the spelling decides matches. Its "Im" and "Ive" entries never fire (the text is
# lowercased first), so "im" and "ive" are absent here too.
_ASCII_APOSTROPHE = "ain't aren't can't couldn't could've we've where's who've".split()
_TYPOGRAPHIC_APOSTROPHE = (
    "didn't doesn't don't hadn't hasn't haven't isn't mightn't mustn't needn't shouldn't wasn't weren't won't "
    "wouldn't he's how's that's there's what's who's it'll they'll you'll it'd they'd you'd might've must've "
    "should've would've they've you've they're you're ma'am o'clock"
).split()
_VQA_CONTRACTIONS = {
    **{form.replace("'", ""): form for form in _ASCII_APOSTROPHE},
    **{form.replace("'", ""): form.replace("'", "\u2019") for form in _TYPOGRAPHIC_APOSTROPHE},
}


def _vqa_punctuation(text: str) -> str:
    """The official punctuation step: a mark next to a space (or any mark, once the text holds a digit,
    digit) is deleted, otherwise it becomes a space ("yes/no" -> "yes no", "1,000" -> "1000")."""
    glued_number = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        # Tested on the input text, not on what earlier marks left: the official order of effects.
        out = out.replace(p, "" if glued_number or p + " " in text or " " + p in text else " ")
    # The official call passes re.UNICODE (32) where sub() takes its count: at most 32 periods go.
    return _PERIOD.sub("", out, count=32)


def normalize_vqa_answer(text: str) -> str:
    """A predicted answer as the official VQAv2 script compares it.

    text: the raw answer. Newlines and tabs become spaces, ends are stripped, the
    punctuation step runs ("1,000" -> "1000", "yes." -> "yes", "3.5" stays), then
    words are lowercased, number words become digits ("Two" -> "2", "none" -> "0"),
    articles go ("the dog." -> "dog") and common unapostrophised contractions
    get one ("dont" -> "don’t", official spelling, see ``_VQA_CONTRACTIONS``).
    """
    text = _vqa_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = []
    for word in text.lower().split():
        word = _VQA_NUMBERS.get(word, word)
        if word not in _VQA_ARTICLES:
            words.append(_VQA_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(predictions: Mapping[Hashable, str], answers: Mapping[Hashable, Sequence[str]]) -> dict[str, Any]:
    """VQAv2 accuracy, in percent.

    predictions: question key -> the model's answer (raw; normalised here).
    answers: the same keys -> the human answers as the annotation file stores
    them (10 per VQAv2 question; any number >= 1 works, but one answer always
    scores 0 since no other answer is left to agree with).
    Returns ``{"accuracy": mean over questions, "per_question": {key: percent}}``,
    unrounded (the official script shows 2 decimals).
    """
    keys = _matched_keys(predictions, answers, "answers")
    per_question: dict[Hashable, float] = {}
    for key in keys:
        pred = predictions[key]
        if not isinstance(pred, str):
            raise TypeError(f"prediction of key {key!r} must be a string, got {type(pred).__name__}")
        pred = normalize_vqa_answer(pred)
        humans = _text_list(answers[key], key, "answers")
        if len(set(humans)) > 1:  # the official script cleans the answers only when they disagree
            humans = [_vqa_punctuation(a) for a in humans]
        hits = sum(a == pred for a in humans)
        # Leave answer i out: the prediction then matches hits - 1 others if answer i was one of its matches.
        acc = sum(min(1.0, (hits - (a == pred)) / 3) for a in humans) / len(humans)
        per_question[key] = 100.0 * acc
    return {"accuracy": sum(per_question.values()) / len(per_question), "per_question": per_question}
