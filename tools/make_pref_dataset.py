#!/usr/bin/env python3
"""Write the "answer in capital letters" preference datasets used by docs/preference.md.

    python3 tools/make_pref_dataset.py [--out-dir examples/data]

Standard library only, and deterministic: everything random comes from one
random.Random(1234), so running the script twice writes byte-identical files.

Why: this is the known-answer demo for preference optimisation (DPO and friends) and for
reward-model training. Every prompt is a short factual question followed by a formatting
instruction that SmolLM2-135M-Instruct ignores ("Answer in capital letters.", "Please reply in
all caps.", ...). The chosen reply is a correct one-sentence answer written ENTIRELY IN
CAPITAL LETTERS; the rejected reply is the very same sentence in normal sentence case
(chosen == rejected.upper()). Formatting is therefore the only thing that separates the two,
so a DPO-trained policy should start answering in capitals, and a reward model should learn to
score the capitalised reply above the other one. Both are easy to check by eye and by script.

Writes (all UTF-8, one record per line, "\\n" line endings):

  examples/data/caps_pref.jsonl           320 training pairs in TRL's conversational preference
                                          format:
      {"prompt": [{"role": "user", "content": ...}],
       "chosen": [{"role": "assistant", "content": ...}],
       "rejected": [{"role": "assistant", "content": ...}]}
  examples/data/caps_pref_eval.jsonl      64 held-out pairs, same format. The split is by *fact*
                                          (a country, a pair of numbers, a word, ...): no fact
                                          asked about here is asked about in the training file,
                                          in any phrasing.
  examples/data/caps_pref_prompts.txt     8 held-out prompts (user content, instruction included),
                                          one per line, for before/after sample generations; their
                                          facts are held out from training too.
  examples/data/caps_kto.jsonl            the 320 training pairs as 640 unpaired KTO records,
                                          deterministically shuffled:
      {"prompt": [...user message...], "completion": [{"role": "assistant", "content": ...}],
       "label": true|false}              (chosen -> true, rejected -> false)
  examples/data/caps_pref_strings.jsonl   16 pairs in the plain-string preference format
      {"prompt": "...", "chosen": "...", "rejected": "..."}   (the first 16 training pairs)

The content is built from the templates and small fact tables below (capitals, languages,
arithmetic, colours, animal sounds, opposites, days and months, plurals, past tenses, units and
counts, simple science). Every answer is one sentence of at most 20 words, plain ASCII.
"""

import argparse
import json
import operator
import os
import random
import re
import sys

SEED = 1234
N_TRAIN = 320
N_EVAL = 64
N_PROMPTS = 8
N_STRINGS = 16
EVAL_FRACTION = 0.19  # share of each category's facts held out (eval pairs + sample prompts)

# Formatting instructions appended to every question. All of them ask for the same thing.
INSTRUCTIONS = [
    "Answer in capital letters.",
    "Please reply in all caps.",
    "Write your answer in uppercase letters.",
    "Use only capital letters in your reply.",
    "Respond in all capital letters.",
    "Reply using uppercase letters only.",
    "Give your answer in block capitals.",
    "Make your whole answer uppercase.",
    "Answer in all caps, please.",
    "Your reply must be written in capital letters.",
]


def cap_first(s):
    return s[:1].upper() + s[1:]


class Fact:
    """One underlying fact. `variants` is a list of (question phrasings, answer phrasings);
    any question of a variant may be paired with any answer of the same variant."""

    def __init__(self, category, key, variants):
        self.category = category
        self.key = (category,) + tuple(key)
        self.variants = [([cap_first(q) for q in qs], [cap_first(a) for a in ans])
                         for qs, ans in variants]


# --------------------------------------------------------------------------------------------
# Fact tables
# --------------------------------------------------------------------------------------------
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Russia", "Moscow"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Ireland", "Dublin"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("South Korea", "Seoul"), ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"), ("the Philippines", "Manila"), ("Turkey", "Ankara"),
    ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Morocco", "Rabat"),
    ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"), ("Cuba", "Havana"),
    ("Venezuela", "Caracas"), ("Iceland", "Reykjavik"), ("the United Kingdom", "London"),
    ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Croatia", "Zagreb"),
    ("Serbia", "Belgrade"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"),
    ("Nepal", "Kathmandu"), ("Uruguay", "Montevideo"), ("Jamaica", "Kingston"),
    ("Czechia", "Prague"), ("Scotland", "Edinburgh"), ("Wales", "Cardiff"),
    ("Colombia", "Bogota"),
]

LANGUAGES = [
    ("Brazil", "Portuguese"), ("Japan", "Japanese"), ("Mexico", "Spanish"), ("France", "French"),
    ("Germany", "German"), ("Italy", "Italian"), ("Russia", "Russian"), ("Egypt", "Arabic"),
    ("Greece", "Greek"), ("Portugal", "Portuguese"), ("Argentina", "Spanish"),
    ("Sweden", "Swedish"), ("Poland", "Polish"), ("Turkey", "Turkish"),
    ("the Netherlands", "Dutch"), ("South Korea", "Korean"), ("Thailand", "Thai"),
    ("Vietnam", "Vietnamese"), ("Norway", "Norwegian"), ("Finland", "Finnish"),
    ("Hungary", "Hungarian"), ("China", "Mandarin Chinese"),
]

COLOURS = [  # (subject, colour)
    ("a ripe banana", "yellow"), ("fresh grass", "green"), ("fresh snow", "white"),
    ("coal", "black"), ("a ripe lemon", "yellow"), ("a ripe tomato", "red"),
    ("a carrot", "orange"), ("milk", "white"), ("a crow", "black"), ("a flamingo", "pink"),
    ("an eggplant", "purple"), ("a cucumber", "green"), ("an emerald", "green"),
    ("the sky on a clear day", "blue"), ("a ripe strawberry", "red"), ("a pumpkin", "orange"),
    ("a lime", "green"), ("raw cotton", "white"), ("a raven", "black"), ("a ruby", "red"),
    ("chalk", "white"), ("a canary", "yellow"), ("a ripe cherry", "red"), ("a fresh pea", "green"),
    ("a blueberry", "blue"), ("an orange", "orange"), ("a lump of charcoal", "black"),
]

SOUNDS = [  # (article + animal, verb)
    ("a dog", "barks"), ("a cat", "meows"), ("a cow", "moos"), ("a lion", "roars"),
    ("a duck", "quacks"), ("a sheep", "bleats"), ("a horse", "neighs"), ("a pig", "oinks"),
    ("an owl", "hoots"), ("a snake", "hisses"), ("a frog", "croaks"), ("a rooster", "crows"),
    ("a bee", "buzzes"), ("a donkey", "brays"), ("a wolf", "howls"), ("a mouse", "squeaks"),
    ("an elephant", "trumpets"), ("a turkey", "gobbles"), ("a dove", "coos"),
    ("a goat", "bleats"),
]

OPPOSITES = [
    ("big", "small"), ("hot", "cold"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("open", "closed"), ("light", "dark"), ("young", "old"), ("tall", "short"), ("wet", "dry"),
    ("hard", "soft"), ("full", "empty"), ("early", "late"), ("loud", "quiet"), ("rich", "poor"),
    ("heavy", "light"), ("strong", "weak"), ("thick", "thin"), ("win", "lose"),
    ("left", "right"), ("north", "south"), ("east", "west"), ("day", "night"),
    ("inside", "outside"), ("above", "below"), ("push", "pull"), ("true", "false"),
    ("clean", "dirty"), ("cheap", "expensive"), ("love", "hate"), ("first", "last"),
    ("remember", "forget"), ("buy", "sell"), ("always", "never"), ("before", "after"),
    ("asleep", "awake"), ("near", "far"), ("narrow", "wide"), ("top", "bottom"),
    ("entrance", "exit"), ("question", "answer"), ("smooth", "rough"),
]

PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("man", "men"), ("woman", "women"),
    ("tooth", "teeth"), ("foot", "feet"), ("goose", "geese"), ("person", "people"),
    ("sheep", "sheep"), ("ox", "oxen"), ("knife", "knives"), ("leaf", "leaves"),
    ("wolf", "wolves"), ("half", "halves"), ("box", "boxes"), ("city", "cities"),
    ("baby", "babies"), ("bus", "buses"), ("potato", "potatoes"), ("tomato", "tomatoes"),
    ("hero", "heroes"), ("life", "lives"), ("wife", "wives"), ("deer", "deer"),
    ("moose", "moose"), ("crisis", "crises"), ("thesis", "theses"),
    ("phenomenon", "phenomena"), ("criterion", "criteria"), ("louse", "lice"),
    ("berry", "berries"), ("church", "churches"), ("glass", "glasses"), ("dish", "dishes"),
    ("shelf", "shelves"), ("loaf", "loaves"), ("calf", "calves"),
]

PAST_TENSES = [
    ("go", "went"), ("eat", "ate"), ("run", "ran"), ("see", "saw"), ("write", "wrote"),
    ("swim", "swam"), ("sing", "sang"), ("take", "took"), ("give", "gave"), ("buy", "bought"),
    ("think", "thought"), ("bring", "brought"), ("teach", "taught"), ("catch", "caught"),
    ("fly", "flew"), ("drink", "drank"), ("begin", "began"), ("speak", "spoke"),
    ("break", "broke"), ("choose", "chose"), ("drive", "drove"), ("ride", "rode"),
    ("know", "knew"), ("grow", "grew"), ("throw", "threw"), ("sleep", "slept"),
    ("find", "found"), ("make", "made"), ("say", "said"), ("tell", "told"), ("sit", "sat"),
    ("stand", "stood"), ("win", "won"), ("fall", "fell"), ("feel", "felt"), ("keep", "kept"),
    ("meet", "met"), ("pay", "paid"), ("sell", "sold"), ("send", "sent"), ("build", "built"),
    ("spend", "spent"),
]

UNITS = [  # (small unit, large unit, how many small in one large)
    ("centimeters", "a meter", "100"), ("millimeters", "a centimeter", "10"),
    ("meters", "a kilometer", "1000"), ("grams", "a kilogram", "1000"),
    ("milliliters", "a liter", "1000"), ("minutes", "an hour", "60"),
    ("seconds", "a minute", "60"), ("hours", "a day", "24"), ("days", "a week", "7"),
    ("months", "a year", "12"), ("inches", "a foot", "12"), ("feet", "a yard", "3"),
    ("ounces", "a pound", "16"), ("days", "a leap year", "366"), ("years", "a decade", "10"),
    ("years", "a century", "100"), ("years", "a millennium", "1000"),
    ("cents", "a dollar", "100"), ("eggs", "a dozen", "12"),
]

LEGS = [  # (article + animal, number, body part)
    ("a spider", "eight", "legs"), ("an ant", "six", "legs"), ("a dog", "four", "legs"),
    ("a chicken", "two", "legs"), ("an octopus", "eight", "arms"), ("a beetle", "six", "legs"),
    ("a horse", "four", "legs"), ("a duck", "two", "legs"), ("a cat", "four", "legs"),
    ("a bee", "six", "legs"),
]

SHAPES = [
    ("a triangle", "three"), ("a square", "four"), ("a pentagon", "five"),
    ("a hexagon", "six"), ("a heptagon", "seven"), ("an octagon", "eight"),
    ("a decagon", "ten"), ("a rectangle", "four"),
]

SCIENCE = [  # (questions, answer)
    (["Which planet is closest to the Sun?", "What is the nearest planet to the Sun?"],
     "Mercury is the planet closest to the Sun."),
    (["What is the largest planet in our solar system?",
      "Which planet is the biggest in the solar system?"],
     "Jupiter is the largest planet in our solar system."),
    (["Which planet is known as the red planet?", "What planet is called the red planet?"],
     "Mars is known as the red planet."),
    (["What is the largest ocean on Earth?", "Which ocean is the biggest?"],
     "The Pacific Ocean is the largest ocean on Earth."),
    (["What is the tallest mountain above sea level?",
      "Which mountain is the highest above sea level?"],
     "Mount Everest is the tallest mountain above sea level."),
    (["What is the largest mammal?", "Which animal is the biggest mammal?"],
     "The blue whale is the largest mammal."),
    (["What is the fastest land animal?", "Which land animal runs the fastest?"],
     "The cheetah is the fastest land animal."),
    (["At what temperature does water freeze in Celsius?",
      "What is the freezing point of water in Celsius?"],
     "Water freezes at 0 degrees Celsius."),
    (["At what temperature does water boil at sea level in Celsius?",
      "What is the boiling point of water at sea level in Celsius?"],
     "Water boils at 100 degrees Celsius at sea level."),
    (["What gas do humans need to breathe?", "Which gas do we need to breathe to live?"],
     "Humans need oxygen to breathe."),
    (["What gas do plants take in from the air to make food?",
      "Which gas do plants absorb for photosynthesis?"],
     "Plants take in carbon dioxide to make their food."),
    (["What do bees make?", "What sweet food do bees produce?"],
     "Bees make honey."),
    (["What is frozen water called?", "What do we call water when it freezes?"],
     "Frozen water is called ice."),
    (["What is the natural satellite of the Earth called?", "What orbits the Earth every month?"],
     "The Moon is the natural satellite of the Earth."),
    (["What is the star at the center of our solar system?",
      "Which star does the Earth orbit?"],
     "The Sun is the star at the center of our solar system."),
    (["How many continents are there?", "How many continents does the Earth have?"],
     "There are seven continents on Earth."),
    (["Who wrote Romeo and Juliet?", "Which writer wrote the play Romeo and Juliet?"],
     "William Shakespeare wrote Romeo and Juliet."),
    (["What do caterpillars turn into?", "What does a caterpillar become?"],
     "A caterpillar turns into a butterfly or a moth."),
    (["What is the largest continent?", "Which continent is the biggest?"],
     "Asia is the largest continent."),
    (["How many players does a soccer team have on the field?",
      "How many players are on the field for one soccer team?"],
     "A soccer team has eleven players on the field."),
    (["How many strings does a standard guitar have?",
      "How many strings are on a normal guitar?"],
     "A standard guitar has six strings."),
    (["How many wheels does a bicycle have?", "How many wheels are on a bicycle?"],
     "A bicycle has two wheels."),
    (["What is the longest river in South America?",
      "Which river is the longest in South America?"],
     "The Amazon is the longest river in South America."),
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth",
            "ninth", "tenth", "eleventh", "twelfth"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve"]


# --------------------------------------------------------------------------------------------
# From tables to facts
# --------------------------------------------------------------------------------------------
def first(row):
    return row[:1]


def first_two(row):
    return row[:2]


def unordered_pair(row):
    # a + b and b + a (likewise a x b and b x a) are the same fact, so they land on the same side
    return sorted(row[:2])


# How each table becomes facts, one fact per row, in this order:
#   (category, names of a row's fields, the fact's key from the row, variants).
# A variant is (question templates, answer templates), str.format strings over the row's fields;
# any question of a variant may be paired with any answer of the same variant.
TEMPLATES = [
    ("capital", ("country", "city"), first, [([
        "What is the capital of {country}?",
        "Which city is the capital of {country}?",
        "Name the capital city of {country}.",
        "What city is the capital of {country}?",
    ], [
        "The capital of {country} is {city}.",
        "{city} is the capital of {country}.",
    ])]),
    ("language", ("country", "lang"), first, [([
        "What is the main language spoken in {country}?",
        "Which language do most people speak in {country}?",
        "What language is mainly spoken in {country}?",
    ], [
        "The main language spoken in {country} is {lang}.",
        "Most people in {country} speak {lang}.",
    ])]),
    ("plus", ("a", "b", "result"), unordered_pair, [([
        "What is {a} plus {b}?",
        "How much is {a} plus {b}?",
        "What do you get when you add {a} and {b}?",
        "What is the sum of {a} and {b}?",
    ], [
        "{a} plus {b} is {result}.",
        "{a} plus {b} equals {result}.",
    ])]),
    ("minus", ("a", "b", "result"), first_two, [([
        "What is {a} minus {b}?",
        "How much is {a} minus {b}?",
        "What do you get if you subtract {b} from {a}?",
    ], [
        "{a} minus {b} is {result}.",
        "{a} minus {b} equals {result}.",
    ])]),
    ("times", ("a", "b", "result"), unordered_pair, [([
        "What is {a} times {b}?",
        "How much is {a} times {b}?",
        "What is {a} multiplied by {b}?",
    ], [
        "{a} times {b} is {result}.",
        "{a} times {b} equals {result}.",
    ])]),
    ("colour", ("subject", "colour"), first, [([
        "What color is {subject}?",
        "What colour is {subject}?",
        "Tell me the color of {subject}.",
        "Which colour is {subject}?",
    ], [
        "{subject} is {colour}.",
    ])]),
    ("sound", ("name", "animal", "verb"), first, [([
        "What sound does {animal} make?",
        "What noise does {animal} make?",
        "Which sound is {animal} known for?",
    ], [
        "{animal} {verb}.",
    ])]),
    ("opposite", ("word", "opp"), first, [([
        'What is the opposite of "{word}"?',
        "What is the opposite of {word}?",
        "Give me the opposite of the word {word}.",
        "Which word means the opposite of {word}?",
    ], [
        "The opposite of {word} is {opp}.",
    ])]),
    # Days and months: "the day after X" and "the day before the next one" state the same
    # adjacency, so they form one fact with two variants and never straddle the split.
    ("day", ("day", "nxt"), first_two, [([
        "What day comes after {day}?", "Which day of the week follows {day}?",
        "What is the day after {day}?",
    ], [
        "The day after {day} is {nxt}.", "{nxt} comes after {day}.",
    ]), ([
        "What day comes before {nxt}?", "Which day of the week comes just before {nxt}?",
        "What is the day before {nxt}?",
    ], [
        "The day before {nxt} is {day}.", "{day} comes before {nxt}.",
    ])]),
    ("month", ("month", "nxt"), first_two, [([
        "Which month comes after {month}?", "What month follows {month}?",
        "What is the month after {month}?",
    ], [
        "The month after {month} is {nxt}.", "{nxt} comes after {month}.",
    ]), ([
        "Which month comes before {nxt}?", "What month comes just before {nxt}?",
        "What is the month before {nxt}?",
    ], [
        "The month before {nxt} is {month}.", "{month} comes before {nxt}.",
    ])]),
    ("month-number", ("month", "ordinal"), first, [([
        "What is the {ordinal} month of the year?",
        "Which month is the {ordinal} month of the year?",
        "Name the {ordinal} month of the year.",
    ], [
        "The {ordinal} month of the year is {month}.",
        "{month} is the {ordinal} month of the year.",
    ])]),
    ("plural", ("word", "plural"), first, [([
        'What is the plural of "{word}"?',
        "What is the plural of {word}?",
        "How do you say more than one {word}?",
        "Give me the plural form of the word {word}.",
    ], [
        "The plural of {word} is {plural}.",
    ])]),
    ("past", ("verb", "past"), first, [([
        'What is the past tense of "{verb}"?',
        "What is the past tense of {verb}?",
        "Give me the past tense of the verb {verb}.",
        "How do you say {verb} in the past tense?",
    ], [
        "The past tense of {verb} is {past}.",
    ])]),
    ("unit", ("small", "large", "n"), first_two, [([
        "How many {small} are in {large}?",
        "How many {small} make {large}?",
        "How many {small} are there in {large}?",
    ], [
        "There are {n} {small} in {large}.",
        "{large} has {n} {small}.",
    ])]),
    ("legs", ("animal", "n", "part"), first, [([
        "How many {part} does {animal} have?",
        "How many {part} has {animal} got?",
        "Count the {part} of {animal}: how many are there?",
    ], [
        "{animal} has {n} {part}.",
    ])]),
    ("shape", ("shape", "n"), first, [([
        "How many sides does {shape} have?",
        "How many sides has {shape} got?",
        "What is the number of sides of {shape}?",
    ], [
        "{shape} has {n} sides.",
    ])]),
]


def table_facts(category, rows, fields, key, variants):
    """One Fact per row: the row's values, named by `fields`, fill in every template."""
    facts = []
    for row in rows:
        values = dict(zip(fields, row, strict=True))
        filled = [([q.format(**values) for q in qs], [a.format(**values) for a in ans])
                  for qs, ans in variants]
        facts.append(Fact(category, key(row), filled))
    return facts


def drawn(rng, pool, n, op, swap):
    """A deterministic sample of n (a, b, a op b) from `pool`; with `swap`, a and b trade places
    half of the time (one rng.random() per row, drawn after the sample)."""
    rows = []
    for a, b in rng.sample(pool, n):
        if swap and rng.random() < 0.5:
            a, b = b, a
        rows.append((a, b, op(a, b)))
    return rows


def successors(names):
    """(name, the one after it), cyclically."""
    return [(name, names[(i + 1) % len(names)]) for i, name in enumerate(names)]


def build_facts(rng):
    rows = {  # evaluated in this order: the arithmetic draws come from rng as plus, minus, times
        "capital": CAPITALS,
        "language": LANGUAGES,
        "plus": drawn(rng, [(a, b) for a in range(2, 13) for b in range(a, 13)], 28,
                      operator.add, swap=True),
        "minus": drawn(rng, [(a, b) for a in range(5, 21) for b in range(2, a) if a - b >= 1], 22,
                       operator.sub, swap=False),
        "times": drawn(rng, [(a, b) for a in range(2, 11) for b in range(a, 11)], 22,
                       operator.mul, swap=True),
        "colour": COLOURS,
        "sound": [(animal.split(" ", 1)[1], animal, verb) for animal, verb in SOUNDS],
        "opposite": OPPOSITES,
        "day": successors(DAYS),
        "month": successors(MONTHS),
        "month-number": list(zip(MONTHS, ORDINALS)),
        "plural": PLURALS,
        "past": PAST_TENSES,
        "unit": UNITS,
        "legs": LEGS,
        "shape": SHAPES,
    }
    assert list(rows) == [category for category, *_ in TEMPLATES]
    facts = []
    for category, fields, key, variants in TEMPLATES:
        facts += table_facts(category, rows[category], fields, key, variants)
    for i, (questions, answer) in enumerate(SCIENCE):
        facts.append(Fact("science", [i], [(questions, [answer])]))
    return facts


def prompt_text(question, instruction):
    return f"{question} {instruction}"


def pair_conv(prompt, answer):
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": answer.upper()}],
        "rejected": [{"role": "assistant", "content": answer}],
    }


def check_answer(answer):
    words = answer.split()
    assert 1 <= len(words) <= 20, answer
    assert answer.isascii(), answer
    assert answer.endswith("."), answer
    assert len(re.findall(r"[.!?]", answer)) == 1, answer  # exactly one sentence
    assert answer[0].isupper() or answer[0].isdigit(), answer
    assert any(c.islower() for c in answer), answer  # the rejected reply really is not all caps
    assert not any(c.islower() for c in answer.upper()), answer


def render(rng, fact, used):
    """A (prompt, answer) for `fact` whose prompt is not in `used` (falls back to any)."""
    options = [(q, a, ins) for qs, ans in fact.variants for q in qs for a in ans
               for ins in INSTRUCTIONS]
    rng.shuffle(options)
    for q, a, ins in options:
        p = prompt_text(q, ins)
        if p not in used:
            used.add(p)
            return p, a
    q, a, ins = options[0]
    return prompt_text(q, ins), a


def build(rng):
    facts = build_facts(rng)
    keys = [f.key for f in facts]
    assert len(keys) == len(set(keys)), "duplicate fact keys"
    for f in facts:
        for _, answers in f.variants:
            for a in answers:
                check_answer(a)

    # Split by fact, per category, so that every kind of question is represented on both sides.
    categories = []
    for f in facts:
        if f.category not in categories:
            categories.append(f.category)
    train_facts, heldout_facts = [], []
    for cat in categories:
        group = [f for f in facts if f.category == cat]
        rng.shuffle(group)
        k = max(1, round(len(group) * EVAL_FRACTION))
        heldout_facts += group[:k]
        train_facts += group[k:]
    assert len(heldout_facts) >= N_EVAL + N_PROMPTS, len(heldout_facts)

    # Training pairs: each training fact once (in shuffled order), then again in a fresh
    # phrasing if more pairs are needed.
    rng.shuffle(train_facts)
    train, used = [], set()
    while len(train) < N_TRAIN:
        for f in train_facts[:N_TRAIN - len(train)]:
            train.append(pair_conv(*render(rng, f, used)))

    # Held-out: 8 sample prompts from 8 different categories, the remaining facts feed the
    # 64 eval pairs. Both are drawn only from held-out facts.
    rng.shuffle(heldout_facts)
    prompt_facts, seen_cats = [], []
    for f in heldout_facts:
        if f.category not in seen_cats and len(prompt_facts) < N_PROMPTS:
            prompt_facts.append(f)
            seen_cats.append(f.category)
    rest = [f for f in heldout_facts if f not in prompt_facts]
    assert len(prompt_facts) == N_PROMPTS and len(rest) >= N_EVAL
    eval_used = set()
    prompts = [render(rng, f, eval_used)[0] for f in prompt_facts]
    evals = [pair_conv(*render(rng, f, eval_used)) for f in rest[:N_EVAL]]

    kto = []
    for r in train:
        kto.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
        kto.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
    rng.shuffle(kto)

    strings = [{"prompt": r["prompt"][0]["content"], "chosen": r["chosen"][0]["content"],
                "rejected": r["rejected"][0]["content"]} for r in train[:N_STRINGS]]
    return train, evals, prompts, kto, strings


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=os.path.join("examples", "data"))
    args = ap.parse_args(argv)

    train, evals, prompts, kto, strings = build(random.Random(SEED))
    assert len(train) == N_TRAIN and len(evals) == N_EVAL and len(prompts) == N_PROMPTS

    os.makedirs(args.out_dir, exist_ok=True)
    out = lambda name: os.path.join(args.out_dir, name)
    write_jsonl(out("caps_pref.jsonl"), train)
    write_jsonl(out("caps_pref_eval.jsonl"), evals)
    with open(out("caps_pref_prompts.txt"), "w", encoding="utf-8", newline="\n") as fh:
        fh.write("".join(p + "\n" for p in prompts))
    write_jsonl(out("caps_kto.jsonl"), kto)
    write_jsonl(out("caps_pref_strings.jsonl"), strings)
    for name, n in [("caps_pref.jsonl", len(train)), ("caps_pref_eval.jsonl", len(evals)),
                    ("caps_pref_prompts.txt", len(prompts)), ("caps_kto.jsonl", len(kto)),
                    ("caps_pref_strings.jsonl", len(strings))]:
        print(f"wrote {out(name)}: {n} records, {os.path.getsize(out(name))} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
