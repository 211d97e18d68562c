"""Training prompts: built-in generators of chat requests, and users' own text files.

`generated` crosses one-line request templates with subjects; `compound` builds longer
multi-part requests (a situation, a task in several parts, a constraint on the answer) about
the same subjects. Both draw in an order fixed by a seed, are written for the project and
share no prompt with the benchmark's set (scripts/prompts).
"""

from __future__ import annotations

import math
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


SITUATIONS = (
    "I am a teacher and next week I have to introduce {s} to a class of teenagers.",
    "A friend asked me about {s} over dinner and I realised I could not explain it well.",
    "I am writing a blog post about {s} for readers who know nothing about it.",
    "I have a job interview on Monday and {s} might come up in the conversation.",
    "I want to spend my weekends learning about {s}, but I do not know where to begin.",
    "My grandmother keeps asking me about {s} and I would like to give her a good answer.",
    "I am giving a five-minute talk about {s} at a local club next month.",
    "My daughter has a school project on {s} and she asked me for help.",
    "I read a confusing article about {s} this morning and it left me with more questions.",
    "I am planning a small workshop for adults who are curious about {s}.",
    "I keep hearing people argue about {s} and I want to understand both sides.",
    "I am a nurse on night shifts, and I like to read about {s} during my breaks.",
)
TASKS = (
    "Could you explain the basic idea, give one everyday example, and say why it matters?",
    "What are the three most important points, and how would you connect them into a story?",
    "How should I structure a short introduction, and which mistakes should I avoid?",
    "What would be a sensible first step, what comes after it, and how do I know I am "
    "making progress?",
    "Can you suggest an outline with a beginning, a middle and an end, and a few questions "
    "to check understanding?",
    "What do people usually get wrong about it, and how would you correct them politely?",
    "Could you compare two ways of thinking about it and tell me which one is easier to "
    "remember?",
    "Which simple comparison or picture would make it click, and how would you use it?",
)
CONSTRAINTS = (
    "Please keep it friendly and not too long.",
    "Use simple words, and end with one question I could ask others.",
    "Please use a numbered list and finish with one practical tip.",
    "Keep it under two hundred words, and avoid jargon.",
    "Write in a warm tone, as if you were talking to a friend.",
    "Please add a short summary at the end in one sentence.",
)


def compound(count: int, seed: int) -> list[str]:
    """`count` distinct multi-part requests, each a situation, a task in several parts and a
    constraint about one subject, drawn without repeats in a seeded order."""
    parts = (SITUATIONS, TASKS, CONSTRAINTS, SUBJECTS)
    space = math.prod(len(p) for p in parts)
    requests = []
    for index in random.Random(seed).sample(range(space), min(count, space)):
        chosen = []
        for options in parts:
            index, i = divmod(index, len(options))
            chosen.append(options[i])
        situation, task, constraint, subject = chosen
        requests.append(f"{situation.format(s=subject)} {task} {constraint}")
    return requests


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
