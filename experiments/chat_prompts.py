"""Chat prompts for self-distillation: the AR parent answers them, the diffusion model learns those answers.

The prompts are built from templates and word lists written here, across the kinds of request a small chat model
handles (facts, definitions, arithmetic, short Python functions, tips, rewording). The README demo's prompts are
held out of the training split (`DEMO_PROMPTS`), so the demo shows answers to questions the adapter never saw.
"""

import random

DEMO_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for staying healthy.",
)

COUNTRIES = [
    "Germany", "Italy", "Spain", "Portugal", "Japan", "China", "India", "Brazil", "Argentina", "Canada", "Mexico",
    "Egypt", "Kenya", "Nigeria", "Australia", "New Zealand", "Russia", "Poland", "Sweden", "Norway", "Finland",
    "Denmark", "Greece", "Turkey", "Iran", "Iraq", "Peru", "Chile", "Colombia", "Cuba", "Ireland", "Scotland",
    "Austria", "Switzerland", "Belgium", "the Netherlands", "Hungary", "Ukraine", "Vietnam", "Thailand",
    "Indonesia", "South Korea", "Pakistan", "Morocco", "Ethiopia", "Ghana", "Venezuela", "Israel", "Iceland",
    "the United States", "the United Kingdom", "Saudi Arabia", "Bangladesh", "the Philippines", "Malaysia",
]
PYTHON_TASKS = [
    "adds two numbers", "returns the largest of three numbers", "checks whether a number is even",
    "computes the factorial of n", "returns the nth Fibonacci number", "counts the vowels in a string",
    "checks whether a string is a palindrome", "removes duplicates from a list", "sums a list of numbers",
    "returns the average of a list", "converts Celsius to Fahrenheit", "checks whether a number is prime",
    "squares every element of a list", "finds the minimum of a list", "counts the words in a sentence",
    "capitalizes every word in a string", "merges two dictionaries", "flattens a list of lists",
    "returns the length of a string without using len", "multiplies two numbers", "computes the area of a circle",
    "returns the last element of a list", "checks whether a list is sorted", "reverses a list",
    "returns the even numbers from a list", "computes the greatest common divisor of two numbers",
    "converts a string to uppercase", "counts how often each character occurs in a string",
    "returns the sum of the digits of a number", "checks whether a year is a leap year",
    "swaps two variables", "returns the second largest number in a list", "joins a list of strings with commas",
    "computes the power of a number", "returns the absolute value of a number", "reads a file and returns its lines",
    "finds the index of an item in a list", "computes the median of a list", "removes whitespace from a string",
    "sorts a list of strings by length", "returns a dictionary of word counts", "converts minutes to hours",
    "checks whether two strings are anagrams", "returns the product of a list", "generates a list of squares",
]
CONCEPTS = [
    "photosynthesis", "gravity", "a black hole", "democracy", "inflation", "an atom", "DNA", "a volcano",
    "the internet", "machine learning", "a prime number", "an ecosystem", "climate change", "electricity",
    "a computer program", "a database", "an algorithm", "a vaccine", "evolution", "a galaxy", "the water cycle",
    "a recipe", "a noun", "a verb", "a metaphor", "a haiku", "an election", "a bank", "a library", "a hospital",
    "a rainbow", "an earthquake", "a hurricane", "friction", "energy", "a molecule", "the moon", "the sun",
    "a planet", "a function in programming", "a variable in programming", "a loop in programming", "recycling",
    "a museum", "a symphony", "a novel", "a map", "a calendar", "the stock market", "a password",
]
ACTIVITIES = [
    "learning a new language", "sleeping better", "saving money", "studying for an exam", "writing clean code",
    "cooking pasta", "running a marathon", "reducing stress", "making friends in a new city", "reading more books",
    "keeping a plant alive", "traveling on a budget", "giving a good presentation", "learning to swim",
    "staying focused at work", "starting a garden", "drinking more water", "organizing a small party",
    "taking better photos", "learning to play the guitar", "writing a short story", "preparing for a job interview",
    "keeping a room tidy", "learning Python", "walking more every day",
]
WORDS = [
    "happy", "big", "fast", "cold", "bright", "old", "strong", "early", "easy", "rich", "quiet", "empty",
    "heavy", "wet", "loud", "young", "hard", "short", "clean", "brave", "kind", "open", "light", "true",
]
LANGUAGES = ["French", "Spanish", "German", "Italian"]
GREETINGS = ["hello", "thank you", "good morning", "goodbye", "please", "water", "cat", "friend", "book", "house"]
ANIMALS = [
    "cats", "dogs", "elephants", "dolphins", "bees", "owls", "penguins", "lions", "horses", "frogs", "whales",
    "ants", "bats", "eagles", "sharks", "snakes", "rabbits", "turtles", "wolves", "camels",
]
STDLIB_FUNCTIONS = [
    "os.path.join", "os.listdir", "os.getcwd", "os.makedirs", "os.remove", "os.path.exists", "os.path.splitext",
    "sys.exit", "sys.argv", "json.dumps", "json.loads", "json.load", "re.match", "re.search", "re.findall",
    "re.sub", "math.sqrt", "math.floor", "math.ceil", "math.gcd", "math.log", "random.choice", "random.shuffle",
    "random.randint", "random.sample", "time.sleep", "time.time", "datetime.date.today", "datetime.timedelta",
    "collections.Counter", "collections.defaultdict", "collections.deque", "collections.namedtuple",
    "itertools.chain", "itertools.product", "itertools.permutations", "itertools.combinations", "itertools.groupby",
    "functools.reduce", "functools.lru_cache", "functools.partial", "heapq.heappush", "heapq.heappop",
    "bisect.bisect_left", "shutil.copyfile", "shutil.rmtree", "glob.glob", "pathlib.Path", "csv.reader",
    "csv.writer", "pickle.dump", "pickle.load", "copy.deepcopy", "string.ascii_letters", "textwrap.wrap",
    "subprocess.run", "argparse.ArgumentParser", "logging.getLogger", "unittest.TestCase", "statistics.mean",
    "statistics.median", "hashlib.sha256", "base64.b64encode", "urllib.parse.urlparse", "zipfile.ZipFile",
    "tempfile.mkdtemp", "enumerate", "zip", "sorted", "map", "filter", "range", "len", "isinstance", "open",
    "print", "input", "int", "str.split", "str.join", "str.strip", "str.replace", "list.append", "list.sort",
    "dict.get", "dict.items", "set.add", "any", "all", "sum", "min", "max", "abs", "round",
]
SENTENCES = [
    "The cat sat on the mat.", "I am going to the store tomorrow.", "She likes to read books in the park.",
    "The weather is very nice today.", "We watched a movie last night.", "He plays football every weekend.",
    "The train was late this morning.", "My brother is learning to cook.", "They built a house near the river.",
    "The children are playing in the garden.", "I forgot my umbrella at home.", "The coffee is too hot to drink.",
]

TEMPLATES = {
    "capital": (["What is the capital of {country}?", "Which city is the capital of {country}?",
                 "Name the capital city of {country}."], {"country": COUNTRIES}),
    "python": (["Write a Python function that {task}.", "Write a short Python function that {task}.",
                "How do I write a Python function that {task}?"], {"task": PYTHON_TASKS}),
    "explain": (["Explain what {concept} is in one sentence.", "What is {concept}?",
                 "Describe {concept} in simple terms."], {"concept": CONCEPTS}),
    "tips": (["Give me three tips for {activity}.", "What are some tips for {activity}?"],
             {"activity": ACTIVITIES}),
    "opposite": (["What is the opposite of '{word}'?", "Give a synonym for '{word}'.",
                  "Use the word '{word}' in a sentence."], {"word": WORDS}),
    "translate": (["How do you say '{greeting}' in {language}?"], {"greeting": GREETINGS, "language": LANGUAGES}),
    "animals": (["Tell me a fun fact about {animal}.", "What do {animal} eat?", "Where do {animal} live?"],
                {"animal": ANIMALS}),
    "stdlib": (["What does {function} do in Python?", "Show a short example of {function} in Python."],
               {"function": STDLIB_FUNCTIONS}),
    "rewrite": (["Rewrite this sentence in the past tense: {sentence}", "Translate to French: {sentence}",
                 "Make this sentence more formal: {sentence}"], {"sentence": SENTENCES}),
}


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return rng.choice([f"What is {a} plus {b}?", f"What is {a} times {b}?", f"What is {a} minus {b}?",
                       f"If I have {a} apples and buy {b} more, how many apples do I have?"])


def all_prompts(seed: int = 0) -> list[tuple[str, str]]:
    """Every (kind, prompt) the templates make, plus arithmetic drawn with `seed`; demo prompts excluded; shuffled."""
    import itertools

    prompts = set()
    for kind, (templates, slots) in TEMPLATES.items():
        names = list(slots)
        for values in itertools.product(*(slots[name] for name in names)):
            for template in templates:
                prompts.add((kind, template.format(**dict(zip(names, values)))))
    rng = random.Random(seed)
    while sum(kind == "arithmetic" for kind, _ in prompts) < 300:
        prompts.add(("arithmetic", _arithmetic(rng)))
    prompts = sorted(p for p in prompts if p[1] not in DEMO_PROMPTS)
    rng.shuffle(prompts)
    return prompts


def split_prompts(held_out_per_kind: int = 8, seed: int = 0):
    """(train, held_out) lists of (kind, prompt): `held_out_per_kind` of each kind are never trained on."""
    train, held_out, taken = [], [], {}
    for kind, prompt in all_prompts(seed):
        if taken.get(kind, 0) < held_out_per_kind:
            taken[kind] = taken.get(kind, 0) + 1
            held_out.append((kind, prompt))
        else:
            train.append((kind, prompt))
    return train, held_out


if __name__ == "__main__":
    train, held_out = split_prompts()
    print(f"{len(train)} training prompts, {len(held_out)} held out")
    for kind, prompt in held_out[:12]:
        print(f"  [{kind}] {prompt}")
