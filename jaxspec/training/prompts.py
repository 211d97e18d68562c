"""Training prompts: a built-in generator of chat requests, and users' own text files.

The generator crosses request templates with subjects, in an order fixed by a seed. It is
written for the project and shares no prompt with the benchmark's set (scripts/prompts).
"""

from __future__ import annotations

import random

from jaxspec.errors import UserError

TEMPLATES = (
    "Explain {s} in simple terms.", "What is {s}? Give a short answer.",
    "Write a short paragraph about {s}.", "Give me three interesting facts about {s}.",
    "What are the pros and cons of {s}?", "How would you explain {s} to a ten-year-old?",
    "Write a haiku about {s}.", "List five questions a student might ask about {s}.",
    "Summarize the history of {s} in a few sentences.", "Why do people care about {s}?",
    "Write a short story that involves {s}.", "What are common misconceptions about {s}?",
    "Give me a step-by-step guide to getting started with {s}.",
    "Compare {s} with something similar and explain the differences.",
    "Write a friendly email to a colleague about {s}.", "What should a beginner know about {s}?",
    "Describe {s} in the style of a news report.", "Write a limerick about {s}.",
    "What are the main ideas behind {s}?", "How has {s} changed over the last hundred years?",
    "Write a Python function related to {s}, with a docstring.",
    "Give a one-sentence definition of {s}, then an example.",
    "What would the world look like without {s}?", "Write a tweet about {s}.",
)
SUBJECTS = (
    "photosynthesis", "black holes", "the French Revolution", "machine learning", "volcanoes",
    "the water cycle", "climate change", "chess", "the Roman Empire", "vaccines",
    "electric cars", "the stock market", "honey bees", "the internet", "gravity",
    "democracy", "coffee", "the human heart", "recycling", "the moon landing", "jazz music",
    "earthquakes", "DNA", "renewable energy", "ancient Egypt", "the printing press",
    "sleep", "rainforests", "cryptography", "the Olympic Games", "bread baking",
    "plate tectonics", "the immune system", "social media", "solar panels", "dinosaurs",
    "the Great Wall of China", "prime numbers", "gardening", "the theory of evolution",
    "hurricanes", "public libraries", "sorting algorithms", "the ocean tides", "penguins",
    "inflation", "the Renaissance", "bicycles", "antibiotics", "the speed of light",
    "mountain climbing", "poetry", "robots", "the periodic table", "friendship",
    "time management", "video games", "rivers", "the Silk Road", "quantum computers",
    "origami", "the solar system", "meditation", "elephants", "the violin", "deserts",
    "first aid", "the metric system", "trains", "the Amazon river", "opera", "recipes for soup",
)


def generated(count: int, seed: int) -> list[str]:
    """`count` distinct chat requests (at most len(TEMPLATES) × len(SUBJECTS)), seeded order."""
    pairs = [(t, s) for t in TEMPLATES for s in SUBJECTS]
    random.Random(seed).shuffle(pairs)
    return [t.format(s=s) for t, s in pairs[:count]]


def from_files(paths, max_chars: int = 600) -> list[str]:
    """Requests made from users' text files: each paragraph (blank-line separated, cut to
    max_chars) becomes "Continue this text: ..."; a missing or unreadable file raises
    UserError."""
    requests = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read text file {path}: {getattr(e, 'strerror', None) or e}")
        for paragraph in text.split("\n\n"):
            paragraph = " ".join(paragraph.split())
            if paragraph:
                requests.append(f"Continue this text:\n{paragraph[:max_chars]}")
    return requests
