"""A seeded generator of long, readable, synthetic text with answers to look up: the benchmark's
default document.

Why generated text: the benchmark must run offline, ship no third-party prose, and scale to any
length. Why this shape: speculation pays off when answers copy the document, so the report holds
things worth copying (paragraphs to quote, tables to list, a boilerplate note that recurs in every
section) next to facts to look up (who leads what, how many staff). Every name and number comes
from one `random.Random(seed)`, so the same seed gives the same text on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# SmolLM2's tokenizer on this text; rough, for sizing: callers that need exact counts cut with a tokenizer
CHARS_PER_TOKEN = 3.4

_FIRST = (
    "Amara",
    "Bruno",
    "Celia",
    "Dmitri",
    "Elena",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Keiko",
    "Lars",
    "Mira",
    "Nikhil",
    "Olga",
    "Pavel",
    "Quentin",
    "Rosa",
    "Soren",
    "Talia",
    "Umar",
    "Vera",
    "Wendell",
    "Ximena",
    "Yusuf",
    "Zofia",
)
_LAST = (
    "Abernathy",
    "Baptiste",
    "Castellanos",
    "Drummond",
    "Eriksen",
    "Fairweather",
    "Galloway",
    "Hartmann",
    "Ishikawa",
    "Jovanovic",
    "Kowalczyk",
    "Lindqvist",
    "Moreau",
    "Nakamura",
    "Okonkwo",
    "Petrov",
    "Quinlan",
    "Rasmussen",
    "Sandoval",
    "Thorne",
    "Underwood",
    "Valdez",
    "Whitaker",
    "Yilmaz",
)
_SYLLABLES = (
    "bel",
    "cor",
    "dun",
    "fal",
    "gar",
    "hol",
    "ist",
    "kel",
    "lor",
    "mar",
    "nor",
    "ost",
    "pen",
    "quar",
    "ros",
    "sel",
    "tam",
    "vel",
    "wyn",
    "zan",
)
_SUFFIXES = ("ford", "haven", "mere", "port", "stead", "ton", "vale", "wick")
_FACILITIES = ("depot", "workshop", "laboratory", "warehouse", "field station", "repair yard", "archive")
_PROJECTS = (
    "cold storage",
    "solar roof",
    "river crossing",
    "inventory audit",
    "night shift",
    "flood barrier",
    "seed bank",
    "signal tower",
    "water filter",
    "rail spur",
    "library annex",
    "bridge survey",
)
_ITEMS = (
    "copper wire",
    "oak beams",
    "pressure valves",
    "canvas tarps",
    "glass jars",
    "steel bolts",
    "rubber hoses",
    "lamp oil",
    "wool blankets",
    "ceramic tiles",
    "brass fittings",
    "rope coils",
    "clay bricks",
    "paper ledgers",
    "iron nails",
    "pine planks",
    "cotton sacks",
    "tin buckets",
)
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_OUTCOMES = (
    "finished two weeks ahead of schedule",
    "ran over budget after a late delivery of parts",
    "was paused during the autumn storms and resumed in spring",
    "was completed by a volunteer crew working on weekends",
    "met every milestone agreed with the regional council",
)
_RECURRING = (
    "Note on figures: as in every section of this report, quantities are counted at the end of "
    "the reporting period, costs are given in crowns, and all numbers were confirmed by the "
    "regional auditor before publication."
)


@dataclass(frozen=True)
class Question:
    """A question about the report; `source` is the passage that holds the answer (for checking the
    passage survived a cut), `answer` what a correct reply contains."""

    text: str
    kind: str  # "quote" (copy a paragraph), "table" (list a table), "fact" (look up names and numbers)
    source: str
    answer: str
    section: int


@dataclass(frozen=True)
class Site:
    """The facts one section states, as drawn (for questions with short answers, e.g. the QA benchmark)."""

    section: int
    place: str
    title: str  # "<place> <facility>", as the section heading names it
    lead: str
    deputy: str
    joined: int  # the year the lead joined the organisation
    staff: int
    shipments: int
    growth: int  # percent
    project: str
    month: str
    crew: int
    budget: int  # crowns
    stock: tuple[tuple[str, int, int], ...]  # (item, quantity, unit cost) rows of the section's table


@dataclass
class Report:
    text: str
    questions: list[Question] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    organisation: str = ""

    def questions_in(self, text: str) -> list[Question]:
        """The questions whose source passage is wholly inside `text` (e.g. a cut of the report)."""
        return [q for q in self.questions if q.source in text]


def _place(rng: random.Random) -> str:
    name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 2))) + rng.choice(_SUFFIXES)
    return name.capitalize()


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"


def _section(rng: random.Random, k: int, org: str, used: set[str]) -> tuple[str, list[Question], Site]:
    place = _place(rng)
    while place in used:  # one site per place name, so every question has one answer
        place = _place(rng) if len(used) < 2000 else f"{_place(rng)} {k}"
    used.add(place)
    facility, lead, deputy = rng.choice(_FACILITIES), _person(rng), _person(rng)
    staff, year, growth = rng.randint(12, 480), rng.randint(1995, 2023), rng.randint(2, 41)
    shipments = rng.randint(1_000, 90_000)
    project, month, outcome = rng.choice(_PROJECTS), rng.choice(_MONTHS), rng.choice(_OUTCOMES)
    cost, crew = rng.randint(8, 900) * 1000, rng.randint(3, 40)
    title = f"{place} {facility}"
    intro = (
        f"The {title} is led by {lead}, who joined {org} in {year}, with {deputy} as deputy. It "
        f"employs {staff} staff and handled {shipments:,} shipments in the reporting period, "
        f"{growth} percent more than in the year before."
    )
    story = (
        f"In {month}, the {title} started the {project} project with a crew of {crew} and a budget "
        f"of {cost:,} crowns. The project {outcome}. {lead} wrote in the closing memo that the "
        f"{project} work at {place} should serve as a model for the other sites of {org}."
    )
    items = rng.sample(_ITEMS, rng.randint(4, 6))
    stock = tuple((it, rng.randint(5, 2000), rng.randint(1, 300)) for it in items)
    rows = [f"| {it} | {qty} | {unit} |" for it, qty, unit in stock]
    table = "\n".join(
        [f"Table {k}: Stock held at the {title}", "", "| Item | Quantity | Unit cost |", "|---|---|---|", *rows]
    )
    text = "\n\n".join([f"## Section {k}: The {title}", intro, story, table, _RECURRING])
    questions = [
        Question(
            f"Quote, word for word, the paragraph about the {project} project at {place}.", "quote", story, story, k
        ),
        Question(
            f"Who leads the {title}, and how many staff does it employ?", "fact", intro, f"{lead}; {staff} staff", k
        ),
        Question(
            f"List every row of Table {k} (stock held at the {title}) with its quantity and unit cost.",
            "table",
            table,
            "\n".join(rows),
            k,
        ),
    ]
    site = Site(k, place, title, lead, deputy, year, staff, shipments, growth, project, month, crew, cost, stock)
    return text, questions, site


def build_report(n_tokens_approx: int, seed: int = 0) -> Report:
    """A report of about `n_tokens_approx` tokens (whole sections; at least one) and its questions."""
    rng = random.Random(seed)
    org = f"the {_place(rng)} Cooperative"
    head = (
        f"# Annual Operations Report of {org}\n\nThis report describes each site of {org} in turn: who "
        "runs it, what it stocks, and the projects it carried out during the reporting period."
    )
    parts, questions, sites, used = [head], [], [], set()
    k = 0
    target_chars = n_tokens_approx * CHARS_PER_TOKEN
    while k == 0 or sum(len(p) + 2 for p in parts) < target_chars:
        k += 1
        text, qs, site = _section(rng, k, org, used)
        parts.append(text)
        questions.extend(qs)
        sites.append(site)
    return Report("\n\n".join(parts) + "\n", questions, sites, org)


def generate_report(n_tokens_approx: int, seed: int = 0) -> str:
    """The text of `build_report` (deterministic for a seed)."""
    return build_report(n_tokens_approx, seed).text


def pick_questions(questions: list[Question], n: int) -> list[Question]:
    """`n` questions that rotate through the kinds (quote, fact, table) and spread over the document's
    depth, so a benchmark sees both copy-heavy and short factual answers from near and far."""
    if n <= 0 or not questions:
        return []
    kinds = ("quote", "fact", "table")
    sections = sorted({q.section for q in questions})
    chosen: list[Question] = []
    for i in range(n):
        depth = sections[min(len(sections) - 1, int((i + 0.5) / n * len(sections)))]
        pool = (
            [q for q in questions if q.kind == kinds[i % 3] and q not in chosen]
            or [q for q in questions if q not in chosen]
            or questions
        )
        chosen.append(min(pool, key=lambda q: (abs(q.section - depth), q.section)))
    return chosen


__all__ = ["Question", "Report", "Site", "build_report", "generate_report", "pick_questions"]
