"""Build `lmedit/data/starter.jsonl`: facts the default model actually knows, with probes for every metric.

Usage:
    LMEDIT_CACHE=/tmp/lm/cache OMP_NUM_THREADS=1 python scripts/build_starter.py [--model gemma3-270m]

Each candidate fact below is kept only if the model's greedy continuation of the fact's prompt starts
with the true object (checked in batches with `lmedit.scoring.generate`). For every kept fact the
script writes one record: a counterfactual `target_new` (another kept object of the same relation),
paraphrases, neighborhood probes (other kept facts of the same relation, preferring ones that share the
true object as CounterFact does), generation prompts, reference sentences about `target_new` (for the
consistency metric) and implication probes:
  symmetric  "A is married to B" -> edit to C  => "C is married to" A (instead of C's own spouse)
  transitive "X is in the city of P" -> edit to R => "X is in the country of" country(R) (instead of country(P))
  reverse    "The capital of F is the city of P" -> edit to R => "R is the capital city of" F (instead of R's country)

Not handled: facts with several correct answers (they are left out of the candidate list by hand).
"""

from __future__ import annotations

import argparse
import json
import logging
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import lmedit
from lmedit.scoring import generate

log = logging.getLogger("build_starter")

OUT = Path(__file__).resolve().parents[1] / "lmedit" / "data" / "starter.jsonl"


@dataclass(frozen=True)
class Relation:
    name: str
    prompt: str                        # template with "{}" for the subject
    paraphrases: tuple[str, ...]
    generation: tuple[str, ...]
    facts: tuple[tuple[str, str], ...]  # (subject, true object)
    kind: str = ""                      # "symmetric", "transitive", "reverse" or "" (no implication)
    implication_prompt: str = ""        # template of the implied fact
    extra: dict = field(default_factory=dict)


# City -> country, used by the transitive (landmark -> city -> country) and reverse (capital) probes.
CITY_COUNTRY = {
    "Paris": "France", "Rome": "Italy", "London": "England", "Berlin": "Germany", "Madrid": "Spain",
    "Moscow": "Russia", "Athens": "Greece", "Tokyo": "Japan", "Beijing": "China", "Cairo": "Egypt",
    "Barcelona": "Spain", "New York": "the United States", "Sydney": "Australia", "Agra": "India",
    "San Francisco": "the United States", "Amsterdam": "the Netherlands", "Lisbon": "Portugal",
    "Vienna": "Austria", "Dublin": "Ireland", "Ottawa": "Canada", "Stockholm": "Sweden", "Oslo": "Norway",
    "Warsaw": "Poland", "Venice": "Italy", "Pisa": "Italy", "Seoul": "South Korea", "Bangkok": "Thailand",
    "Havana": "Cuba", "Prague": "the Czech Republic", "Budapest": "Hungary", "Helsinki": "Finland",
    "Copenhagen": "Denmark", "Canberra": "Australia", "Buenos Aires": "Argentina", "Lima": "Peru",
    "Nairobi": "Kenya", "Ankara": "Turkey", "New Delhi": "India", "Mexico City": "Mexico",
}

RELATIONS = [
    Relation(
        "capital", "The capital of {} is the city of",
        ("The capital of {} is called", "{} has its capital in the city of"),
        ("{} is a country", "The people of {} live in", "{}'s largest city is"),
        (("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
         ("Russia", "Moscow"), ("Greece", "Athens"), ("Japan", "Tokyo"), ("China", "Beijing"),
         ("Egypt", "Cairo"), ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
         ("Canada", "Ottawa"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Poland", "Warsaw"),
         ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("Cuba", "Havana"), ("Hungary", "Budapest"),
         ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Australia", "Canberra"),
         ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Turkey", "Ankara"),
         ("India", "New Delhi"), ("Mexico", "Mexico City"), ("the Netherlands", "Amsterdam")),
        kind="reverse", implication_prompt="{} is the capital city of"),
    Relation(
        "landmark_city", "{} is located in the city of",
        ("{} stands in the city of", "You can visit {} in the city of"),
        ("{} is", "Tourists visiting {} can see", "{} was built"),
        (("The Eiffel Tower", "Paris"), ("The Colosseum", "Rome"), ("Big Ben", "London"),
         ("The Statue of Liberty", "New York"), ("The Brandenburg Gate", "Berlin"),
         ("The Sagrada Familia", "Barcelona"), ("The Kremlin", "Moscow"), ("The Acropolis", "Athens"),
         ("The Sydney Opera House", "Sydney"), ("The Golden Gate Bridge", "San Francisco"),
         ("The Louvre", "Paris"), ("The Taj Mahal", "Agra"), ("The Leaning Tower of Pisa", "Pisa"),
         ("The Tower of London", "London"), ("The Vatican", "Rome"), ("The Empire State Building", "New York"),
         ("Buckingham Palace", "London"), ("The Prado Museum", "Madrid"), ("Red Square", "Moscow"),
         ("The Rialto Bridge", "Venice")),
        kind="transitive", implication_prompt="{} is located in the country of"),
    Relation(
        "spouse", "{} is married to",
        ("{} is the husband of", "The spouse of {} is"),
        ("{} is", "{} and his wife", "{} is famous for"),
        (("Barack Obama", "Michelle Obama"), ("Bill Clinton", "Hillary Clinton"), ("Jay-Z", "Beyoncé"),
         ("Prince William", "Kate Middleton"), ("John Lennon", "Yoko Ono"), ("David Beckham", "Victoria Beckham"),
         ("Kanye West", "Kim Kardashian"), ("Johnny Cash", "June Carter"), ("Prince Charles", "Camilla"),
         ("Brad Pitt", "Angelina Jolie"), ("Tom Hanks", "Rita Wilson"), ("Will Smith", "Jada Pinkett Smith")),
        kind="symmetric", implication_prompt="{} is married to"),
    Relation(
        "antonym", "The opposite of {} is",
        ("The antonym of {} is", "{} is the opposite of"),
        ("The word {} means", "Something that is {} is", "{} describes"),
        (("hot", "cold"), ("big", "small"), ("up", "down"), ("black", "white"), ("day", "night"),
         ("left", "right"), ("happy", "sad"), ("fast", "slow"), ("light", "dark"), ("wet", "dry"),
         ("rich", "poor"), ("love", "hate"), ("open", "closed"), ("early", "late"), ("hard", "soft"),
         ("win", "lose"), ("north", "south"), ("east", "west"), ("true", "false"), ("old", "new")),
        kind="symmetric", implication_prompt="The opposite of {} is"),
    Relation(
        "official_language", "The official language of {} is",
        ("In {}, the official language is", "People in {} officially speak"),
        ("{} is a country", "The culture of {}", "Visitors to {} should know"),
        (("Brazil", "Portuguese"), ("France", "French"), ("Germany", "German"), ("Japan", "Japanese"),
         ("Mexico", "Spanish"), ("Italy", "Italian"), ("Russia", "Russian"), ("Egypt", "Arabic"),
         ("the Netherlands", "Dutch"), ("Greece", "Greek"), ("Sweden", "Swedish"), ("Poland", "Polish"),
         ("Turkey", "Turkish"), ("Portugal", "Portuguese"), ("Argentina", "Spanish"), ("Finland", "Finnish"),
         ("South Korea", "Korean"), ("Thailand", "Thai"), ("Hungary", "Hungarian"), ("Israel", "Hebrew"))),
    Relation(
        "continent", "{} is located in the continent of",
        ("{} is a country in the continent of", "{} belongs to the continent of"),
        ("{} is a country", "The history of {}", "{} is known for"),
        (("Kenya", "Africa"), ("Brazil", "South America"), ("France", "Europe"), ("Japan", "Asia"),
         ("Canada", "North America"), ("Egypt", "Africa"), ("Argentina", "South America"), ("India", "Asia"),
         ("Germany", "Europe"), ("Nigeria", "Africa"), ("Peru", "South America"), ("China", "Asia"),
         ("Mexico", "North America"), ("Spain", "Europe"), ("Ghana", "Africa"), ("Chile", "South America"),
         ("Vietnam", "Asia"), ("Italy", "Europe"), ("Ethiopia", "Africa"), ("Colombia", "South America"))),
    Relation(
        "author", "{} was written by",
        ("The author of {} is", "{} is a book by"),
        ("{} is a book", "The story of {}", "{} tells"),
        (("Hamlet", "William Shakespeare"), ("Pride and Prejudice", "Jane Austen"),
         ("Harry Potter", "J.K. Rowling"), ("War and Peace", "Leo Tolstoy"), ("The Odyssey", "Homer"),
         ("Don Quixote", "Miguel de Cervantes"), ("Oliver Twist", "Charles Dickens"),
         ("Moby-Dick", "Herman Melville"), ("The Divine Comedy", "Dante"), ("Romeo and Juliet", "William Shakespeare"),
         ("Nineteen Eighty-Four", "George Orwell"), ("The Great Gatsby", "F. Scott Fitzgerald"),
         ("Crime and Punishment", "Fyodor Dostoevsky"), ("The Hobbit", "J.R.R. Tolkien"),
         ("A Christmas Carol", "Charles Dickens"), ("Macbeth", "William Shakespeare")),
        kind="reverse", implication_prompt="{} wrote"),
    Relation(
        "painter", "{} was painted by",
        ("The painter of {} is", "{} is a painting by"),
        ("{} is a painting", "{} shows", "The painting {}"),
        (("The Mona Lisa", "Leonardo da Vinci"), ("The Starry Night", "Vincent van Gogh"),
         ("The Last Supper", "Leonardo da Vinci"), ("Guernica", "Pablo Picasso"), ("The Scream", "Edvard Munch"),
         ("The Persistence of Memory", "Salvador Dalí"), ("Girl with a Pearl Earring", "Johannes Vermeer"),
         ("The Birth of Venus", "Sandro Botticelli"), ("The Night Watch", "Rembrandt"),
         ("Sunflowers", "Vincent van Gogh"), ("The Creation of Adam", "Michelangelo"))),
    Relation(
        "currency", "The currency of {} is the",
        ("In {}, people pay with the", "The money used in {} is the"),
        ("{} is a country", "The economy of {}", "Shopping in {}"),
        (("Japan", "yen"), ("the United Kingdom", "pound"), ("India", "rupee"), ("China", "yuan"),
         ("Russia", "ruble"), ("Mexico", "peso"), ("the United States", "dollar"), ("Switzerland", "franc"),
         ("South Korea", "won"), ("Brazil", "real"), ("Poland", "zloty"), ("Thailand", "baht"),
         ("Israel", "shekel"), ("Turkey", "lira"), ("Sweden", "krona"), ("Vietnam", "dong"))),
    Relation(
        "founder", "{} was founded by",
        ("The founder of {} is", "{} is a company started by"),
        ("{} is a company", "{} makes", "The history of {}"),
        (("Apple", "Steve Jobs"), ("Microsoft", "Bill Gates"), ("Amazon", "Jeff Bezos"),
         ("Facebook", "Mark Zuckerberg"), ("SpaceX", "Elon Musk"), ("Ford Motor Company", "Henry Ford"),
         ("Tesla", "Elon Musk"), ("Walt Disney Productions", "Walt Disney"), ("Oracle", "Larry Ellison"),
         ("Google", "Larry Page")),
        kind="reverse", implication_prompt="{} founded"),
    Relation(
        "chemical_symbol", "The chemical symbol for {} is",
        ("The element {} has the symbol", "On the periodic table, {} is written as"),
        ("{} is a chemical element", "{} is used", "The element {}"),
        (("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("sodium", "Na"), ("oxygen", "O"), ("carbon", "C"),
         ("lead", "Pb"), ("copper", "Cu"), ("hydrogen", "H"), ("helium", "He"), ("potassium", "K"),
         ("nitrogen", "N"), ("calcium", "Ca"), ("mercury", "Hg"), ("tin", "Sn"))),
]


def _fold(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))


def knows(continuation: str, answer: str) -> bool:
    """Greedy continuation starts with the answer (case- and accent-insensitive, ignoring a leading 'the ')."""
    text = _fold(continuation.strip())
    answer = _fold(answer)
    return text.startswith(answer) or (text.startswith("the ") and text[4:].startswith(answer.removeprefix("the ")))


def check(lm: lmedit.LM, prompts: list[str], answers: list[str], batch_size: int) -> tuple[list[bool], list[str]]:
    outs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        outs += generate(lm, prompts[start:start + batch_size], max_new_tokens=8, greedy=True)
        log.info("checked %d/%d prompts", min(start + batch_size, len(prompts)), len(prompts))
    return [knows(o, a) for o, a in zip(outs, answers)], outs


def pick_new(facts: list[tuple[str, str]], i: int) -> str:
    """Target_new for fact i: the object of the next kept fact (cyclically) whose object differs."""
    subject, true = facts[i]
    for k in range(1, len(facts)):
        obj = facts[(i + k) % len(facts)][1]
        if obj != true:
            return obj
    raise ValueError(f"relation has a single object {true!r}")


def sentences_about(entity: str, kept: dict[str, list[tuple[str, str]]]) -> list[str]:
    """Reference text about `entity`: every kept fact whose subject or object it is, as a sentence."""
    out = []
    for rel in RELATIONS:
        for subject, obj in kept.get(rel.name, []):
            if entity in (subject, obj):
                out.append(f"{rel.prompt.format(subject)} {obj}.")
    return out


def implication(rel: Relation, subject: str, true: str, new: str, kept: list[tuple[str, str]]) -> list[dict]:
    own = dict(kept)
    if rel.kind == "symmetric":
        # C's own answer under the relation is the foil; fall back to the old object when C is not a subject.
        foil = own.get(new, true)
        if foil == subject:
            return []
        return [{"kind": "symmetric", "prompt": rel.implication_prompt, "subject": new, "target": subject,
                 "foil": foil}]
    if rel.kind == "transitive":
        new_country, old_country = CITY_COUNTRY.get(new), CITY_COUNTRY.get(true)
        if not new_country or not old_country or new_country == old_country:
            return []
        return [{"kind": "transitive", "prompt": rel.implication_prompt, "subject": subject, "target": new_country,
                 "foil": old_country}]
    if rel.kind == "reverse":
        inverse = {obj: subj for subj, obj in kept}  # R -> the subject R really belongs to
        if rel.name == "capital":
            foil = CITY_COUNTRY.get(new)
        else:
            foil = inverse.get(new)
        if not foil or foil == subject:
            return []
        return [{"kind": "reverse", "prompt": rel.implication_prompt, "subject": new, "target": subject, "foil": foil}]
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    lm = lmedit.load(args.model)
    prompts, answers, where = [], [], []
    for rel in RELATIONS:
        for subject, obj in rel.facts:
            prompts.append(rel.prompt.format(subject))
            answers.append(obj)
            where.append((rel.name, subject, obj))
    ok, outs = check(lm, prompts, answers, args.batch_size)
    kept: dict[str, list[tuple[str, str]]] = {}
    generations: dict[tuple[str, str], str] = {}
    for good, out, (rel_name, subject, obj) in zip(ok, outs, where):
        if good:
            kept.setdefault(rel_name, []).append((subject, obj))
            generations[(rel_name, subject)] = out
        else:
            log.info("dropped %s: %r -> %r (expected %r)", rel_name, subject, out, obj)

    records = []
    for rel in RELATIONS:
        facts = kept.get(rel.name, [])
        if len(facts) < 3:
            log.warning("relation %s keeps only %d facts; left out", rel.name, len(facts))
            continue
        for i, (subject, true) in enumerate(facts):
            new = pick_new(facts, i)
            others = [f for j, f in enumerate(facts) if j != i and f[1] != new]
            others.sort(key=lambda f: f[1] != true)  # CounterFact style first: neighbours sharing the true object
            neighborhood = [{"prompt": rel.prompt.format(s), "target": o} for s, o in others[:5]]
            records.append({
                "case_id": f"{rel.name}-{i}",
                "relation": rel.name,
                "requested_rewrite": {"prompt": rel.prompt, "subject": subject, "target_true": {"str": true},
                                      "target_new": {"str": new}},
                "paraphrase_prompts": [p.format(subject) for p in rel.paraphrases],
                "neighborhood": neighborhood,
                "generation_prompts": [p.format(subject) for p in rel.generation],
                "reference_texts": sentences_about(new, kept) or [f"{rel.prompt.format(subject)} {new}."],
                "implications": implication(rel, subject, true, new, facts),
                "known": {"model": lm.name, "greedy": generations[(rel.name, subject)]},
            })
    # Interleave relations (round robin) so that the first N records of the file span many relations.
    by_relation: dict[str, list[dict]] = {}
    for record in records:
        by_relation.setdefault(record["relation"], []).append(record)
    queues = list(by_relation.values())
    records = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    n_rel = len({r["relation"] for r in records})
    n_imp = sum(len(r["implications"]) for r in records)
    log.info("kept %d of %d candidate facts across %d relations (%d implication probes) -> %s",
             len(records), len(prompts), n_rel, n_imp, args.out)


if __name__ == "__main__":
    main()
