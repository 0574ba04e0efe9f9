"""Caption and VQA metrics: parity with pycocoevalcap, hand-worked cases, the official VQAv2 rules."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from blip2_fast.metrics import PTB_PUNCTUATION, caption_scores, coco_tokenize, normalize_vqa_answer, vqa_accuracy

# 20 images, 5 references each, written like COCO captions (mixed case and punctuation on purpose).
REFERENCES = {
    101: [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a wave.",
        "Surfer in a black wetsuit catching a wave.",
        "A man is surfing on a big blue wave.",
    ],
    102: [
        "Two dogs playing with a frisbee in the park.",
        "A pair of dogs chase a red frisbee on the grass.",
        "Dogs running after a frisbee in a grassy field.",
        "Two brown dogs play in the park with a toy.",
        "A dog jumps to catch a frisbee while another dog watches.",
    ],
    103: [
        "A plate of food with broccoli, rice and chicken.",
        "A white plate topped with chicken and broccoli.",
        "Chicken, rice, and broccoli on a dinner plate.",
        "A healthy meal of rice with broccoli and meat.",
        "Food on a plate including broccoli and rice.",
    ],
    104: [
        "A cat laying on top of a laptop computer.",
        "A gray cat sleeping on a keyboard of a laptop.",
        "The cat is lying on the open laptop.",
        "A cat naps on a laptop on a desk.",
        "A kitten resting on top of a computer keyboard.",
    ],
    105: [
        "A red double-decker bus driving down the street.",
        "A double decker bus on a city street.",
        "A red bus is driving down a busy road.",
        "A tour bus with two levels drives past buildings.",
        "The red double-decker bus is parked at a stop.",
    ],
    106: [
        "A bathroom with a toilet, sink, and mirror.",
        "A small bathroom with a white toilet and sink.",
        "A clean bathroom with a mirror over the sink.",
        "A toilet next to a sink in a bathroom.",
        "White bathroom fixtures in a tiled room.",
    ],
    107: [
        "A giraffe standing in the grass near trees.",
        "A tall giraffe standing in a grassy field.",
        "There is a giraffe that is standing in the grass.",
        "A giraffe eating leaves from a tall tree.",
        "One giraffe standing alone on the savanna.",
    ],
    108: [
        "A young boy swinging a baseball bat at a ball.",
        "A boy at bat during a little league game.",
        "A child swings a bat at a baseball.",
        "A kid in a uniform hitting a baseball.",
        "A little boy playing baseball in a field.",
    ],
    109: [
        "A pizza with pepperoni sitting on a wooden table.",
        "A pepperoni pizza on a table next to drinks.",
        "A large pizza with cheese and pepperoni.",
        "A whole pizza sitting on a wooden board.",
        "Pepperoni pizza ready to be eaten on the table.",
    ],
    110: [
        "A woman holding an umbrella while walking down a street.",
        "A woman walks in the rain with an umbrella.",
        "A lady with a black umbrella on a rainy street.",
        "A person carrying an umbrella on a wet sidewalk.",
        "A woman under an umbrella crossing the street.",
    ],
    111: [
        "Two men are playing tennis on a court.",
        "Two tennis players on a blue court.",
        "A couple of men play a game of tennis.",
        "Men playing doubles tennis on a hard court.",
        "Two people hitting a tennis ball back and forth.",
    ],
    112: [
        "A group of people standing around a table with food.",
        "People gathered around a table full of food.",
        "A group of friends eating dinner together.",
        "Several people at a party with food on a table.",
        "A crowd of people near a buffet table.",
    ],
    113: [
        "A black and white photo of a train on the tracks.",
        "An old train traveling down the tracks.",
        "A black and white picture of a steam train.",
        "A train on a railway in a black and white photo.",
        "A vintage train engine on the railroad tracks.",
    ],
    114: [
        "A stop sign on a pole at an intersection.",
        "A red stop sign next to a street.",
        "A stop sign in front of a building.",
        "The stop sign is on the corner of the street.",
        "A street sign and a stop sign on a pole.",
    ],
    115: [
        "A person on skis going down a snowy hill.",
        "A skier skiing down a snow covered slope.",
        "A man skiing down a mountain in the snow.",
        "A skier in a red jacket going downhill.",
        "Someone skiing on a steep snowy slope.",
    ],
    116: [
        "A bowl of fruit with apples, oranges and bananas.",
        "A fruit bowl full of apples and oranges.",
        "Bananas, apples, and oranges in a bowl.",
        "A wooden bowl holding various fruits.",
        "A bowl filled with fresh fruit on a counter.",
    ],
    117: [
        "A motorcycle parked on the side of the road.",
        "A black motorcycle parked next to a curb.",
        "A motorbike sitting on the side of a street.",
        "A parked motorcycle near a brick wall.",
        "A shiny motorcycle is parked on the road.",
    ],
    118: [
        "An elephant walking next to its baby.",
        "A mother elephant and a baby elephant walking.",
        "Two elephants, an adult and a calf, in a field.",
        "A baby elephant following its mother.",
        "Elephants walking together in the dirt.",
    ],
    119: [
        "A large jet flying through a blue sky.",
        "An airplane flying high in the clear sky.",
        "A passenger plane in the air on a sunny day.",
        "A white jet flies through the blue sky.",
        "A plane is flying in a cloudless sky.",
    ],
    120: [
        "A kitchen with wooden cabinets and a stove.",
        "A clean kitchen with a stove and a refrigerator.",
        "A kitchen with white appliances and wood cabinets.",
        "An empty kitchen with a stove and a sink.",
        "A small kitchen with a microwave above the stove.",
    ],
}
PREDICTIONS = {
    101: "a man riding a wave on top of a surfboard",  # identical to a reference once tokenized
    102: "two dogs playing with a frisbee",
    103: "a plate of food",  # short: brevity penalty territory
    104: "a cat cat cat cat laying on a laptop",  # repeated word: clipping against the reference counts
    105: "a red bus",
    106: "",  # empty prediction
    107: "a giraffe standing in the grass near some trees in a field on a sunny day with other animals around it",
    108: "a boy swinging a bat",
    109: "a pizza sitting on top of a wooden table",
    110: "a woman walking down a street holding an umbrella",
    111: "two men playing tennis on a tennis court",
    112: "a group of people",
    113: "a train",
    114: "a stop sign",
    115: "a person skiing down a snowy hill",
    116: "a bowl of fruit",
    117: "a motorcycle parked on the side of the road",
    118: "the the the the",  # nonsense repeats
    119: "a plane",
    120: "a kitchen with a stove",
}
KEYS = list(REFERENCES)


def _tokenized(keys):
    refs = {k: [coco_tokenize(r) for r in REFERENCES[k]] for k in keys}
    preds = {k: coco_tokenize(PREDICTIONS[k]) for k in keys}
    return preds, refs


def _peer_scores(preds, refs):
    res = {k: [v] for k, v in preds.items()}
    bleu, _ = Bleu(4).compute_score(refs, res, verbose=0)  # verbose=0: no progress print
    cider, _ = Cider().compute_score(refs, res)
    return dict(zip(["bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider"], [*bleu, float(cider)], strict=True))


# ---------------------------------------------------------------- captions: parity with pycocoevalcap


@pytest.mark.parametrize("n_images", [20, 7, 2, 1])
def test_caption_scores_match_pycocoevalcap(n_images):
    preds, refs = _tokenized(KEYS[:n_images])
    ours = caption_scores(preds, refs, tokenize=False)
    theirs = _peer_scores(preds, refs)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-12, rel=0), name
    if n_images == 20:  # the corpus is not trivial: scores well away from 0 and 1
        assert 0.3 < ours["bleu_4"] < 0.9 and 0.5 < ours["cider"] < 3


def test_caption_scores_tokenize_is_coco_tokenize():
    preds, refs = _tokenized(KEYS)
    raw = caption_scores(PREDICTIONS, REFERENCES)
    assert raw == caption_scores(preds, refs, tokenize=False)


def test_caption_scores_order_of_keys_does_not_matter():
    preds, refs = _tokenized(KEYS)
    shuffled = {k: refs[k] for k in reversed(KEYS)}
    a, b = caption_scores(preds, refs, tokenize=False), caption_scores(preds, shuffled, tokenize=False)
    for name in a:
        assert a[name] == pytest.approx(b[name], abs=1e-12)


# ---------------------------------------------------------------- captions: hand-worked


def test_perfect_match_bleu_is_one():
    refs = {1: ["a dog runs on the beach", "a brown dog"], 2: ["two cats sleep on a sofa today"]}
    preds = {1: "a dog runs on the beach", 2: "two cats sleep on a sofa today"}
    scores = caption_scores(preds, refs)
    for k in range(1, 5):  # exact up to pycocoevalcap's 1e-9 guard in each denominator
        assert scores[f"bleu_{k}"] == pytest.approx(1.0, abs=1e-9)


def test_bleu_brevity_penalty_and_empty_order():
    # "a cat sat" against "a cat sat on the mat": every 1-, 2-, 3-gram matches, BP = exp(1 - 6/3) = e^-1.
    # No 4-gram exists: pycocoevalcap's guards give that order (0 + 1e-15) / (0 + 1e-9) = 1e-6, so
    # BLEU-4 = (1 * 1 * 1 * 1e-6) ** (1/4) * e^-1, not 0.
    scores = caption_scores({0: "a cat sat"}, {0: ["a cat sat on the mat"]})
    for k in (1, 2, 3):
        assert scores[f"bleu_{k}"] == pytest.approx(math.exp(-1), rel=1e-9)
    assert scores["bleu_4"] == pytest.approx(1e-6**0.25 * math.exp(-1), rel=1e-6)


def test_bleu_closest_reference_length_ties_go_to_the_shorter():
    # 4 candidate words, references of 3 and 5 words: both 1 away, the 3-word one counts, so no
    # brevity penalty (taking 5 would give exp(1 - 5/4)). Unigram matches a, b, c -> 3/4.
    scores = caption_scores({0: "a b c d"}, {0: ["a b c", "a b c q r"]})
    assert scores["bleu_1"] == pytest.approx(0.75, rel=1e-9)


def test_cider_hand_worked():
    # Two images, log(2) idf numerator. "a" is in both images' references: weight 0.
    # Image 1 "a dog" vs "a dog": the unigram and bigram cosines are 1, orders 3 and 4 are empty:
    # 10 * (1 + 1 + 0 + 0) / 4 = 5. Image 2 "a cat" vs "a bird": no weighted n-gram shared: 0.
    scores = caption_scores({1: "a dog", 2: "a cat"}, {1: ["a dog"], 2: ["a bird"]})
    assert scores["cider"] == pytest.approx(2.5, rel=1e-12)


def test_cider_clipping_and_length_penalty():
    # One image alone has idf 0 everywhere; a second image gives "dog", "runs", "dog runs" weight
    # a = log 2 (df 1), and "runs dog" (in no reference, df taken as 1) weight a too.
    refs = {1: ["dog runs"], 2: ["cat"]}
    near = caption_scores({1: "dog runs", 2: "x"}, refs)["cider"]
    # Image 1: unigram and bigram cosines 1, no 3- or 4-grams: 10 * 2 / 4 = 5; image 2 shares nothing: 0.
    assert near == pytest.approx(2.5, rel=1e-12)
    far = caption_scores({1: "dog runs dog runs", 2: "x"}, refs)["cider"]
    # Unigrams: candidate (2a, 2a), clipped to the reference's (a, a) in the dot product:
    # 2a^2 / (sqrt(8) a * sqrt(2) a) = 1/2. Bigrams: "dog runs" 2a clipped to a, "runs dog" a unmatched:
    # a^2 / (sqrt(5) a * a) = 1/sqrt(5). Length gap 2 words: penalty exp(-2^2 / (2 * 6^2)).
    image_1 = 10 * (0.5 + 1 / math.sqrt(5)) / 4 * math.exp(-4 / 72)
    assert far == pytest.approx(image_1 / 2, rel=1e-12)


def test_empty_predictions_score_zero():
    scores = caption_scores({1: "", 2: ""}, {1: ["a dog"], 2: ["a cat"]})
    assert all(v == pytest.approx(0.0, abs=1e-6) for v in scores.values())


def test_caption_key_mismatch_names_the_keys():
    refs = {"img1": ["a dog"], "img2": ["a cat"]}
    with pytest.raises(ValueError, match=r"no prediction for 1 key.*'img2'"):
        caption_scores({"img1": "a dog"}, refs)
    with pytest.raises(ValueError, match=r"1 prediction key.*'img9'"):
        caption_scores({"img1": "a dog", "img2": "a cat", "img9": "x"}, refs)
    many = {f"k{i}": "x" for i in range(9)}
    with pytest.raises(ValueError, match=r"'k0', 'k1', 'k2', 'k3', 'k4', \.\.\. \(9 in all\)"):
        caption_scores({**many, "img1": "a", "img2": "b"}, refs)


def test_caption_bad_references():
    with pytest.raises(ValueError, match=r"key 'img2' has no references"):
        caption_scores({"img1": "a dog", "img2": "a cat"}, {"img1": ["a dog"], "img2": []})
    with pytest.raises(TypeError, match=r"'img1'.*sequence of strings"):
        caption_scores({"img1": "a dog"}, {"img1": "a dog"})  # a bare string is not a list of references
    with pytest.raises(ValueError, match="empty"):
        caption_scores({}, {})


# ---------------------------------------------------------------- COCO tokenizer

# Expected outputs are what the Java pipeline (PTBTokenizer 3.4.1 -preserveLines -lowerCase, then
# pycocoevalcap's punctuation filter) gives for these lines.
TOKENIZER_CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("Don't you think it's a dog's toy?", "do n't you think it 's a dog 's toy"),
    ("I'm sure they're fine; we've seen he'll go, I'd say.", "i 'm sure they 're fine we 've seen he 'll go i 'd say"),
    ("Can't, won't, cannot, shouldn't've", "ca n't wo n't can not should n't 've"),
    ("The dogs' bowls (two of them) are [red]...", "the dogs bowls -lrb- two of them -rrb- are -lsb- red -rsb-"),
    ('A sign that reads "STOP" -- really!!', "a sign that reads stop really !!"),
    (
        "A 1,000-piece puzzle costs $5.50 at 3:30 p.m. in the U.S.",
        "a 1,000-piece puzzle costs $ 5.50 at 3:30 p.m. in the u.s.",
    ),
    ("Mr. Smith visits St. Louis, etc.", "mr. smith visits st. louis etc."),
    ("a black-and-white photo - of 50% off & more", "a black-and-white photo of 50 % off & more"),
    ("gonna wanna gotta y'all o'clock ma'am the 90's", "gon na wan na got ta y' all o'clock ma'am the 90 's"),
    ("don\u2019t \u201cquote\u201d a \u2013 b\u2026", "do n't quote a b"),
    ("  Two   spaces\tand a\nnewline  ", "two spaces and a newline"),
    ("", ""),
]


@pytest.mark.parametrize(("text", "expected"), TOKENIZER_CASES)
def test_coco_tokenize_examples(text, expected):
    assert coco_tokenize(text) == expected


# Not "y' all": Java too reads a detached "y'" as a word and a closing quote.
@pytest.mark.parametrize("expected", [out for _, out in TOKENIZER_CASES if "y'" not in out])
def test_coco_tokenize_is_idempotent(expected):
    assert coco_tokenize(expected) == expected


def test_coco_tokenize_matches_java_ptbtokenizer():
    """Only where Java is installed: the jar pycocoevalcap ships, run the way pycocoevalcap runs it."""
    import pycocoevalcap

    jar = Path(next(iter(pycocoevalcap.__path__))) / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    if shutil.which("java") is None or not jar.is_file():
        pytest.skip("needs java and pycocoevalcap's Stanford jar")
    lines = [text for text, _ in TOKENIZER_CASES] + [c for refs in REFERENCES.values() for c in refs]
    lines += list(PREDICTIONS.values())
    lines = [line.replace("\n", " ") for line in lines]  # one caption a line, as pycocoevalcap feeds it
    cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    out = subprocess.run(cmd, input="\n".join(lines), capture_output=True, text=True, timeout=60, check=True)
    java = [" ".join(w for w in row.rstrip().split(" ") if w not in PTB_PUNCTUATION) for row in out.stdout.split("\n")]
    assert [coco_tokenize(line) for line in lines] == java[: len(lines)]


# ---------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("the dog.", "dog"),
        ("An apple", "apple"),
        ("1,000", "1000"),  # a digit,digit anywhere: every mark is deleted, not spaced
        ("x,y 1,2", "xy 12"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("5.", "5"),
        ("e.g.", "eg"),
        ("yes/no", "yes no"),  # a mark with no space beside it becomes a space
        ("red, white", "red white"),  # a mark next to a space is deleted
        ("don't", "don't"),  # the apostrophe is not in the official list, nor ":"
        ("8:00", "8:00"),
        ("t-shirt", "t shirt"),  # "-" is
        ("dont", "don\u2019t"),  # ... and its contraction map writes the typographic apostrophe
        ("isnt", "isn\u2019t"),
        ("cant", "can't"),  # one of the few entries the official map writes with "'"
        ("Im", "im"),  # the official map's "Im" never fires: words are lowercased first
        ("hello!", "hello"),  # "!" is: it becomes a space, which the word split drops
        ("  A  big\tdog\n", "big dog"),
        ("", ""),
    ],
)
def test_normalize_vqa_answer(text, expected):
    assert normalize_vqa_answer(text) == expected


def test_vqa_accuracy_leave_one_out():
    ten = ["yes"] * 3 + ["no"] * 7
    preds = {"q1": "yes", "q2": "no", "q3": "maybe", "q4": "Yes.", "q5": "yes", "q6": "yes", "q7": "yes"}
    answers = {
        "q1": ten,
        "q2": ten,
        "q3": ten,
        "q4": ten,
        "q5": ["yes"] + ["no"] * 9,
        "q6": ["yes"] * 2 + ["no"] * 8,
        "q7": ["yes", "yes", "no"],
    }
    result = vqa_accuracy(preds, answers)
    per = result["per_question"]
    # q1: leaving out one of the 3 "yes" leaves 2 matches -> 2/3 (3 subsets); leaving out a "no" leaves
    # 3 -> min(1, 3/3) = 1 (7 subsets): (3 * 2/3 + 7 * 1) / 10 = 0.9.
    assert per["q1"] == pytest.approx(90.0)
    assert per["q2"] == pytest.approx(100.0)  # 7 matches: at least 6 left in every subset
    assert per["q3"] == 0.0
    assert per["q4"] == pytest.approx(90.0)  # normalised to "yes"
    # q5: (1 * 0/3 + 9 * 1/3) / 10 = 0.3.  q6: (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    assert per["q5"] == pytest.approx(30.0)
    assert per["q6"] == pytest.approx(60.0)
    # q7, three answers: (2 * 1/3 + 1 * 2/3) / 3 = 4/9.
    assert per["q7"] == pytest.approx(400 / 9)
    assert result["accuracy"] == pytest.approx(sum(per.values()) / 7)


def test_vqa_answers_are_compared_as_stored():
    # The official script normalises the prediction fully but the human answers only with its
    # punctuation step, and only when they disagree: VQAv2 stores them normalised already.
    per = vqa_accuracy(
        {"a": "Two", "b": "two", "c": "yes", "d": "yes"},
        {"a": ["2"] * 10, "b": ["two"] * 10, "c": ["yes."] * 9 + ["no"], "d": ["yes."] * 10},
    )["per_question"]
    assert per["a"] == pytest.approx(100.0)
    assert per["b"] == 0.0  # "2" never equals the stored "two"
    assert per["c"] == pytest.approx(100.0)  # answers disagree: "yes." -> "yes"
    assert per["d"] == 0.0  # all agree: left as "yes."


def test_vqa_key_mismatch_and_bad_answers():
    with pytest.raises(ValueError, match=r"no prediction for 1 key.*'q2'"):
        vqa_accuracy({"q1": "yes"}, {"q1": ["yes"] * 10, "q2": ["no"] * 10})
    with pytest.raises(ValueError, match=r"1 prediction key.*'q3'"):
        vqa_accuracy({"q1": "yes", "q3": "no"}, {"q1": ["yes"] * 10})
    with pytest.raises(ValueError, match=r"key 'q1' has no answers"):
        vqa_accuracy({"q1": "yes"}, {"q1": []})
    with pytest.raises(TypeError, match=r"prediction of key 'q1'"):
        vqa_accuracy({"q1": None}, {"q1": ["yes"]})


def test_vqa_answers_keep_colons_and_apostrophes_as_the_official_script_does():
    # ten humans agreeing on "8:00" or "don't": the same answer scores 100, not 0
    answers = {"time": ["8:00"] * 10, "verb": ["don't"] * 10, "shirt": ["t shirt"] * 10}
    preds = {"time": "8:00", "verb": "Don't.", "shirt": "T-shirt"}
    assert vqa_accuracy(preds, answers)["per_question"] == {"time": 100.0, "verb": 100.0, "shirt": 100.0}
