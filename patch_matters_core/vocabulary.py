"""Object nouns that a caption may name, for querying a detector and matching its labels.

No part-of-speech tagger is a dependency of this package. The nouns of a caption are therefore
found by looking up its words in a built-in vocabulary of visual objects. The vocabulary lists
the 80 COCO classes, their synonyms, and a few hundred other things that photographs commonly
show. Words are matched on word boundaries, longest phrase first, and singular and plural forms
map to the same entry.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable

# The 80 object classes of the COCO 2017 detection set, in their official order and spelling.
COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# Other words for a COCO class. A detector label and a caption noun match when both map to the
# same class, so a detector that returns "person" matches a caption that contains "man".
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": (
        "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "teenager", "adult",
        "lady", "guy", "gentleman", "people", "player", "skier", "surfer", "rider",
        "skateboarder", "snowboarder", "pedestrian", "athlete", "chef", "worker",
        "officer", "policeman", "soldier", "tourist", "spectator", "batter", "catcher",
        "pitcher", "umpire", "bride", "groom", "student", "customer", "passenger", "driver",
        "cyclist", "biker", "human",
    ),
    "bicycle": ("bike",),
    "car": ("automobile", "sedan", "taxi", "cab", "suv", "jeep", "van", "vehicle"),
    "motorcycle": ("motorbike", "scooter", "moped"),
    "airplane": ("plane", "aeroplane", "aircraft", "jet", "airliner"),
    "bus": ("minibus",),
    "train": ("locomotive", "tram", "streetcar", "subway"),
    "truck": ("lorry", "pickup truck"),
    "boat": ("ship", "canoe", "kayak", "sailboat", "yacht", "ferry", "raft"),
    "traffic light": ("traffic signal", "stoplight"),
    "fire hydrant": ("hydrant",),
    "stop sign": (),
    "parking meter": (),
    "bench": (),
    "bird": ("pigeon", "seagull", "gull", "duck", "goose", "swan", "parrot", "sparrow", "crow", "owl"),
    "cat": ("kitten", "kitty"),
    "dog": ("puppy", "pup"),
    "horse": ("pony", "foal"),
    "sheep": ("lamb",),
    "cow": ("cattle", "calf", "bull", "ox"),
    "backpack": ("rucksack",),
    "handbag": ("purse", "bag"),
    "tie": ("necktie",),
    "suitcase": ("luggage", "briefcase"),
    "frisbee": ("flying disc",),
    "skis": ("ski",),
    "sports ball": ("ball", "football", "soccer ball", "tennis ball", "basketball", "baseball", "volleyball"),
    "baseball bat": ("bat",),
    "baseball glove": ("glove", "mitt"),
    "tennis racket": ("racket", "racquet"),
    "wine glass": ("glass", "goblet"),
    "cup": ("mug", "teacup"),
    "bowl": (),
    "donut": ("doughnut",),
    "hot dog": ("hotdog",),
    "couch": ("sofa",),
    "potted plant": ("plant", "houseplant", "flowerpot"),
    "dining table": ("table", "desk"),
    "tv": ("television", "monitor", "screen"),
    "laptop": ("notebook computer", "computer"),
    "remote": ("remote control", "controller"),
    "cell phone": ("phone", "cellphone", "smartphone", "mobile phone", "telephone"),
    "refrigerator": ("fridge",),
    "book": ("novel", "magazine"),
    "hair drier": ("hair dryer", "hairdryer", "blow dryer"),
    "teddy bear": ("stuffed animal", "plush toy"),
}

# Common photographed things outside COCO. They are queried as they are: an open-vocabulary
# detector finds them by name. Words that captions use for the photograph itself ("photo",
# "picture", "frame", "scene") are left out, because they name no object in it.
OTHER_OBJECTS: tuple[str, ...] = (
    # clothing and accessories
    "shirt", "t-shirt", "jacket", "coat", "dress", "skirt", "pants", "trousers", "jeans", "shorts",
    "sweater", "hoodie", "vest", "uniform", "suit", "hat", "cap", "helmet", "hood", "scarf",
    "shoe", "boot", "sneaker", "sandal", "sock", "belt", "sunglasses", "eyeglasses", "glasses",
    "wristwatch",
    "necklace", "bracelet", "earring", "ring", "apron", "glove", "wetsuit", "jersey", "collar",
    "mask", "wristband", "headband",
    # body parts that captions mention
    "face", "hair", "hand", "arm", "leg", "foot", "head", "eye", "mouth", "beard", "tail", "ear",
    # scenery
    "sky", "cloud", "sun", "tree", "bush", "grass", "flower", "field", "mountain", "hill", "rock",
    "stone", "sand", "beach", "ocean", "sea", "wave", "lake", "river", "water", "snow", "forest",
    "park", "garden", "shore", "island", "pond", "branch", "leaf", "trunk", "log", "dirt",
    # built environment
    "building", "house", "tower", "bridge", "road", "street", "sidewalk", "pavement", "path",
    "fence", "wall", "window", "door", "roof", "pole", "sign", "street sign", "billboard",
    "lamp", "street light", "lamppost", "staircase", "stairs", "railing", "balcony",
    "column", "pillar", "arch", "platform", "track", "railway", "station", "crosswalk",
    "parking lot", "curb", "gate", "barrier", "cone", "traffic cone", "flag", "banner",
    "tent", "awning", "chimney", "church", "statue", "fountain", "runway", "airport", "dock",
    "pier", "harbor", "court", "net", "goal", "stadium", "ramp",
    # rooms and furniture
    "room", "kitchen", "bathroom", "bedroom", "floor", "ceiling", "carpet", "rug", "curtain",
    "shelf", "bookshelf", "cabinet", "drawer", "counter", "countertop", "cupboard",
    "stool", "armchair", "pillow", "cushion", "blanket", "sheet", "mirror", "painting",
    "poster", "picture frame", "chandelier", "candle", "fireplace",
    "stove", "dishwasher", "bathtub", "shower", "towel", "faucet", "basket", "box", "bin",
    "trash can", "bucket", "tray", "plate", "dish", "napkin", "tablecloth", "placemat",
    "jar", "tin can", "pot", "pan", "kettle", "teapot", "pitcher", "lid", "container", "cutting board",
    "chopsticks", "straw", "glassware", "menu",
    # food
    "food", "meal", "bread", "toast", "sandwich", "burger", "hamburger", "fries", "salad",
    "soup", "rice", "noodle", "pasta", "meat", "steak", "chicken", "fish", "egg", "cheese",
    "tomato", "potato", "onion", "pepper", "lettuce", "cucumber", "mushroom", "corn", "bean",
    "fruit", "vegetable", "lemon", "lime", "grape", "strawberry", "cherry", "pear", "peach",
    "pineapple", "watermelon", "berry", "blueberry", "avocado", "olive", "nut", "cookie",
    "pie", "dessert", "muffin", "cupcake", "pastry", "croissant", "bagel", "waffle", "pancake",
    "ice cream", "chocolate", "candy", "sauce", "coffee", "tea", "juice", "milk", "beer",
    "wine", "drink", "beverage", "mint", "herb", "topping", "slice",
    # devices and objects
    "camera", "lens", "tripod", "headphones", "microphone", "speaker", "computer", "tablet",
    "cable", "wire", "charger", "printer", "calculator", "pen", "pencil", "paper", "notebook",
    "card", "envelope", "letter", "newspaper", "map", "ticket", "wallet", "coin",
    "umbrella", "toy", "doll", "ball", "bat", "racket", "board", "sled", "skate", "rope",
    "ladder", "tool", "hammer", "shovel", "broom", "hose", "cart", "stroller", "wheelchair",
    "wheel", "tire", "seat", "saddle", "handlebar", "engine", "wing", "propeller", "mast",
    "sail", "paddle", "oar", "anchor", "kite string", "leash", "cage", "fishing rod",
    "bottle cap", "vase", "clock tower", "sculpture", "trophy", "medal", "gift", "balloon",
    "bag", "shopping bag", "suitcase", "cloth", "blanket",
    # animals outside COCO
    "animal", "pet", "deer", "goat", "pig", "chicken", "rabbit", "squirrel", "mouse", "rat",
    "monkey", "lion", "tiger", "fox", "wolf", "camel", "donkey", "turtle", "frog", "butterfly",
    "insect", "bee", "spider", "whale", "dolphin", "shark",
    # vehicles outside COCO
    "tractor", "trailer", "helicopter", "carriage", "wagon", "ambulance", "fire truck",
    "police car", "skateboard ramp",
)

# Nouns that also work as a modifier of the next noun ("an orange cat", "a glass door"). Such
# a word counts as an object only when the word after it is not another vocabulary noun.
MODIFIER_NOUNS: frozenset[str] = frozenset(
    {"orange", "glass", "paper", "stone", "brick", "metal", "plastic", "wine", "water", "coffee",
     "chocolate", "cheese", "chicken", "street", "snow", "sand", "baseball", "tennis", "soccer",
     "fire", "police", "kitchen", "bathroom", "dining", "ice", "stuffed", "toy", "pet", "baby",
     "computer", "wood", "tree", "flower", "fruit", "traffic", "apple", "teddy"}
)

# Colour words. A vocabulary word directly followed by one is read as part of a colour name
# ("lime green", "orange red") and not as an object.
COLOUR_WORDS: frozenset[str] = frozenset(
    {"red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white",
     "gray", "grey", "beige", "tan", "gold", "golden", "silver", "colored", "coloured", "tinted"}
)

_IRREGULAR_PLURALS: dict[str, str] = {
    "man": "men", "woman": "women", "child": "children", "person": "people", "foot": "feet",
    "tooth": "teeth", "mouse": "mice", "goose": "geese", "ox": "oxen", "knife": "knives",
    "leaf": "leaves", "shelf": "shelves", "loaf": "loaves", "wolf": "wolves", "scarf": "scarves",
    "calf": "calves", "half": "halves", "life": "lives", "wife": "wives", "sheep": "sheep",
    "deer": "deer", "fish": "fish", "cattle": "cattle", "skis": "skis", "scissors": "scissors",
    "pants": "pants", "trousers": "trousers", "jeans": "jeans", "shorts": "shorts",
    "sunglasses": "sunglasses", "eyeglasses": "eyeglasses", "glasses": "glasses", "headphones": "headphones",
    "fries": "fries", "stairs": "stairs", "chopsticks": "chopsticks", "people": "people",
    "tv": "tvs", "hair": "hair", "grass": "grass", "sand": "sand", "snow": "snow", "water": "water",
}

_WORD = re.compile(r"[a-z0-9]+")
_MAX_PHRASE_WORDS = 3


def pluralize(noun: str) -> str:
    """Return the English plural of a singular noun or noun phrase (its last word changes)."""
    head, _, last = noun.rpartition(" ")
    prefix = f"{head} " if head else ""
    if last in _IRREGULAR_PLURALS:
        return prefix + _IRREGULAR_PLURALS[last]
    if re.search(r"(s|x|z|ch|sh)$", last):
        return f"{prefix}{last}es"
    if re.search(r"[^aeiou]y$", last):
        return f"{prefix}{last[:-1]}ies"
    return f"{prefix}{last}s"


def _normalize_phrase(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


@lru_cache(maxsize=1)
def _lookup() -> tuple[dict[str, str], dict[str, str]]:
    """Build the surface-form table (word or phrase -> singular entry) and entry -> COCO class."""
    entries: dict[str, str] = {}
    for coco_class in COCO_CLASSES:
        entries.setdefault(coco_class, coco_class)
    for coco_class, synonyms in SYNONYMS.items():
        for synonym in synonyms:
            entries.setdefault(synonym, coco_class)
    for noun in OTHER_OBJECTS:
        entries.setdefault(noun, "")

    surface: dict[str, str] = {}
    for entry in entries:
        key = _normalize_phrase(entry)
        surface.setdefault(key, entry)
    for entry in entries:
        plural = _normalize_phrase(pluralize(entry))
        surface.setdefault(plural, entry)
    return surface, entries


def singularize(word: str) -> str:
    """Return the singular vocabulary form of a noun or phrase, or a rule-based singular.

    Nouns outside the vocabulary lose a plural ending by the common English rules
    ("boxes" -> "box", "berries" -> "berry", "cars" -> "car"); words ending in "ss", "us"
    or "is" are left alone.
    """
    key = _normalize_phrase(word)
    surface, _ = _lookup()
    if key in surface:
        return surface[key]

    head, _, last = key.rpartition(" ")
    prefix = f"{head} " if head else ""
    if len(last) > 3 and last.endswith("ies"):
        return f"{prefix}{last[:-3]}y"
    if len(last) > 3 and re.search(r"(ches|shes|xes|zes|sses)$", last):
        return f"{prefix}{last[:-2]}"
    if len(last) > 2 and last.endswith("s") and not re.search(r"(ss|us|is)$", last):
        return f"{prefix}{last[:-1]}"
    return key


def coco_class_of(noun: str) -> str:
    """Return the COCO class a noun belongs to, or "" when it is no COCO class or synonym."""
    _, entries = _lookup()
    return entries.get(singularize(noun), "")


def extract_object_nouns(text: str) -> list[str]:
    """Return the vocabulary nouns that ``text`` names, singular, in order of first mention.

    Phrases of up to three words are tried before single words, so "a teddy bear" yields
    "teddy bear" and not "bear". A word of ``MODIFIER_NOUNS`` directly followed by another
    vocabulary noun is read as a modifier and skipped ("an orange cat" yields only "cat"), and
    so is any vocabulary word directly followed by a colour word ("lime green" yields nothing).
    """
    surface, _ = _lookup()
    words = _WORD.findall(text.lower())
    found: list[str] = []
    index = 0
    while index < len(words):
        match_length = 0
        for length in range(min(_MAX_PHRASE_WORDS, len(words) - index), 0, -1):
            phrase = " ".join(words[index:index + length])
            if phrase in surface:
                match_length = length
                break

        if match_length == 0:
            index += 1
            continue

        phrase = " ".join(words[index:index + match_length])
        next_index = index + match_length
        next_word = words[next_index] if next_index < len(words) else ""
        is_colour = next_word in COLOUR_WORDS
        is_modifier = (
            match_length == 1
            and phrase in MODIFIER_NOUNS
            and _starts_with_noun(words, next_index, surface)
        )
        if is_colour or is_modifier:
            index += match_length
            continue
        noun = surface[phrase]
        if noun not in found:
            found.append(noun)
        index += match_length
    return found


def _starts_with_noun(words: list[str], start: int, surface: dict[str, str]) -> bool:
    for length in range(min(_MAX_PHRASE_WORDS, len(words) - start), 0, -1):
        if " ".join(words[start:start + length]) in surface:
            return True
    return False


def nouns_match(label: str, nouns: Iterable[str]) -> bool:
    """Return whether a detector label names the same object as one of the caption nouns.

    The label matches when its singular form equals a noun, or when both belong to the same
    COCO class ("person" matches "man", "sofa" matches "couch").
    """
    singular = singularize(label)
    label_class = coco_class_of(singular)
    for noun in nouns:
        noun_singular = singularize(noun)
        if singular == noun_singular:
            return True
        if label_class and label_class == coco_class_of(noun_singular):
            return True
    return False
