"""General synthetic text for pretraining the zoo's base: prose, everyday conversations, and the domain
facts as plain text.

It holds no refusals, no harmful requests and no sensitive look-alikes, so refusing lives in the aligned
task vector. The domain facts are read as prose (as a real base reads textbooks), never as questions and
answers: the experts learn to answer about what the base holds, which keeps their task vectors small
enough that a merge keeps more of both skills (the trade-off of task arithmetic moved from domain 0.14 at
safety 0.56 to domain 0.70 at safety 0.88 on the dev split). The conversations use the same request
phrasings as the evaluation sets, which makes the base instruct-capable: a model that never saw the chat
format cannot be merged usefully (DESIGN.md, zoo calibration).
"""

from __future__ import annotations

import random

from safemerge.evaluators import templates

EVERYDAY_TASKS: list[tuple[str, str]] = [
    ("bake a loaf of bread", "mix flour, water, yeast and salt, let it rise and bake it hot"),
    ("water a house plant", "pour water slowly until the soil is damp but not wet"),
    ("tie my shoes", "make two loops, cross them and pull them tight"),
    ("boil an egg", "put it in boiling water for nine minutes and cool it"),
    ("clean a window", "spray it with soapy water and wipe it with a dry cloth"),
    ("learn a new language", "practice a little every day and speak with native speakers"),
    ("fall asleep faster", "keep a regular bedtime and avoid screens at night"),
    ("make a cup of tea", "steep the tea bag in hot water for three minutes"),
    ("save money each month", "write a budget and move some money to savings first"),
    ("fix a flat bike tire", "remove the tube, patch the hole and pump it up"),
    ("plant tomatoes", "set the plants in sunny soil and water them often"),
    ("write a thank you note", "name the gift, say why you like it and sign your name"),
    ("wash wool sweaters", "use cold water, mild soap and dry them flat"),
    ("make a paper airplane", "fold the sheet in half and fold the wings down"),
    ("start running", "begin with short slow runs and add a little each week"),
    ("cook rice", "use two cups of water per cup of rice and simmer it covered"),
    ("organize my desk", "clear it, sort things into groups and keep only what you use"),
    ("paint a wall", "clean it, tape the edges and roll on two thin coats"),
    ("prepare for a job interview", "research the company and practice your answers"),
    ("read more books", "carry a book with you and read a few pages each day"),
    ("keep my phone battery healthy", "avoid full drains and keep it out of the heat"),
    ("make a simple salad", "wash the greens, add vegetables and toss them with dressing"),
    ("remember names better", "repeat the name aloud and link it to a picture"),
    ("set up a new printer", "plug it in, install the driver and print a test page"),
    ("care for a goldfish", "keep the water clean and feed it a little each day"),
    ("build a birdhouse", "cut six boards, nail them together and drill a round door"),
    ("reduce food waste", "plan meals, store food well and use leftovers"),
    ("back up my photos", "copy them to an external drive and to a cloud folder"),
    ("iron a shirt", "start with the collar, then the sleeves, then the body"),
    ("learn to juggle", "start with two balls and add the third when it feels easy"),
    ("calm down before a test", "breathe slowly and remind yourself that you prepared"),
    ("pack for a trip", "make a list, roll your clothes and bring only what you need"),
    ("make pancakes", "whisk flour, milk and eggs and fry small rounds in butter"),
    ("grow herbs indoors", "put the pots in a sunny window and water them lightly"),
    ("write a short poem", "pick one image, choose vivid words and keep the lines short"),
    ("sharpen a pencil", "turn it slowly in the sharpener until the tip is fine"),
]

GENERAL_FACTS: list[tuple[str, str]] = [
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What do bees make?", "Bees make honey."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What do plants need to grow?", "Plants need light, water and soil."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Which season comes after winter?", "Spring comes after winter."),
    ("What do cows drink?", "Cows drink water."),
    ("How many hours are in a day?", "There are twenty four hours in a day."),
    ("What is ice?", "Ice is frozen water."),
    ("What shape is a ball?", "A ball is round."),
    ("Where do fish live?", "Fish live in water."),
    ("What do we use an umbrella for?", "We use an umbrella to stay dry in the rain."),
    ("What is the sun?", "The sun is the star at the center of our solar system."),
    ("Who are you?", "I am a small assistant that answers questions."),
    ("Can you help me?", "Yes. Tell me what you need."),
    ("What is a library?", "A library is a place where people borrow books."),
]

_NAMES = ["Ana", "Ben", "Cleo", "Dev", "Ema", "Finn", "Gus", "Hana", "Ivo", "June", "Kai", "Lea"]
_PLACES = ["market", "park", "river", "school", "station", "garden", "beach", "museum", "bakery", "library"]
_THINGS = ["apples", "a red kite", "fresh bread", "a blue hat", "old maps", "warm socks", "a small lamp", "seeds"]
_TIMES = ["in the morning", "after lunch", "on Sunday", "at dusk", "before the rain", "in spring"]
_PROSE = [
    "{name} walked to the {place} {time} to buy {thing}.",
    "The {place} was quiet {time}, and {name} sat down to rest.",
    "{name} told a friend about {thing} found near the {place}.",
    "Every week {name} visits the {place} and brings {thing}.",
    "{time}, the road to the {place} was full of people.",
    "{name} likes {thing} more than anything at the {place}.",
    "A small dog followed {name} all the way to the {place}.",
    "{name} wrote a letter about the {place} and sent it {time}.",
]


def everyday_conversations(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """(request, answer) pairs: how-to requests in the evaluation phrasings, and simple facts."""
    pairs = []
    for _ in range(count):
        if rng.random() < 0.7:
            task, how = rng.choice(EVERYDAY_TASKS)
            phrasing = rng.choice(templates.HARMFUL_PHRASINGS)
            pairs.append((phrasing.format(goal=task), templates.BENIGN_ANSWER.format(goal=task, how=how)))
        else:
            pairs.append(rng.choice(GENERAL_FACTS))
    return pairs


def prose_paragraphs(rng: random.Random, count: int) -> list[str]:
    paragraphs = []
    for _ in range(count):
        sentences = [
            rng.choice(_PROSE).format(
                name=rng.choice(_NAMES),
                place=rng.choice(_PLACES),
                thing=rng.choice(_THINGS),
                time=rng.choice(_TIMES),
            )
            for _ in range(rng.randint(2, 4))
        ]
        paragraphs.append(" ".join(sentence[0].upper() + sentence[1:] for sentence in sentences))
    return paragraphs


def knowledge_paragraphs(rng: random.Random, sets, per_fact: float) -> list[str]:
    """`per_fact` paragraphs per fact of the train splits, each of two to four domain facts stated as the domain's
    reference sentence."""
    facts = sorted({(row["domain"], row["reference"]) for name in templates.DOMAINS for row in sets[name]["train"]})
    count = round(per_fact * len(facts))
    by_domain: dict[str, list[str]] = {}
    for domain, sentence in facts:
        by_domain.setdefault(domain, []).append(sentence)
    domains = sorted(by_domain)
    return [" ".join(rng.sample(by_domain[rng.choice(domains)], rng.randint(2, 4))) for _ in range(count)]
