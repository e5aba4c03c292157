"""Generate the retrieval-quality evaluation set: group chats over weeks, with labelled questions.

Deterministic: the same seed writes byte-identical files. Run from anywhere:

    python benchmarks/data/make_conversations.py [--seed 20261130] [--conversations 18]

Writes, beside this script:

* ``quality_conversations.jsonl`` — one line per conversation: ``conversation_id``, ``split``
  (``dev`` or ``test``; split by whole conversation), ``people``, and ``sessions`` (each a
  ``session_id``, ``date`` (ISO, the day the chat happened) and ``turns`` (``id``, ``speaker``,
  ``text``, and for a turn that tells of a dated activity ``event_date``, the day it happened)).
* ``quality_questions.jsonl`` — one line per question: ``id``, ``conversation_id``, ``split``,
  ``category`` (``single_hop``, ``multi_hop``, ``temporal``, ``knowledge_update``), ``question``,
  ``asked_at`` (ISO date: questions are asked two days after the conversation's last session),
  ``evidence`` (the turn ids that answer it), ``stale`` (knowledge-update only: turns holding the
  superseded answer, which must rank below the current one) and ``answer`` (a short gold answer).

What makes it hard for any single signal:

* Each fact is said with one of many paraphrases, and asked with others (few shared words).
* Distractor turns share the question's words: friends ask each other about the very facts
  ("Priya, how's work?"), others state the same kind of fact ("Tom works at a hospital too"),
  small talk reuses names, cities and topics.
* Multi-hop questions join two turns told in different sessions (a sibling named in one, their
  job in another; an employer in one, the home city in another).
* Temporal questions ask *when* something happened or *what someone did in a month*; the same
  person does similar things in other months, and activities are told with relative dates
  ("last Saturday", "two days ago") that only the session date resolves.
* Knowledge updates: a fact told early is changed later (moved, new job, new diet); the old turn
  shares more words with the question than the new one often does.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

FIRST_NAMES = (
    "Priya Tom Aisha Mateo Hana Lukas Chloe Omar Ingrid Kenji Zara Felix Nadia Diego Freya Ravi "
    "Elena Marcus Yuki Sofia Jonas Amara Leo Mei Theo Lina Sam Noor Oscar Ruth Ivan Clara Malik "
    "Greta Arjun Bea Hugo Iris Kofi Maya"
).split()
SIBLING_NAMES = (
    "Dev Anya Rosa Ben Kai Lea Nico Tara Ezra Mila Jude Suki Remy Alba Finn Cleo Vik Nell Otto Pia"
).split()
CITIES = (
    "Leeds Bristol Lisbon Porto Lyon Utrecht Glasgow Valencia Bologna Gdansk Tallinn Cork Aarhus "
    "Ghent Seville Malmo Bergen Graz Nantes Brno"
).split()
EMPLOYERS = [
    ("Northwind Logistics", "a route planner"), ("Lumen Labs", "a data analyst"),
    ("Harbor Bank", "a risk analyst"), ("St Aidan's Hospital", "a pediatric nurse"),
    ("Copperleaf Studio", "a game artist"), ("Brightline Rail", "a signalling engineer"),
    ("Fernhill School", "a chemistry teacher"), ("Quillon Press", "an editor"),
    ("Asterisk Robotics", "a firmware engineer"), ("Greenway Council", "an urban planner"),
    ("Marlow & Finch", "a tax lawyer"), ("Pebble Health", "a product manager"),
    ("Solstice Energy", "a wind turbine technician"), ("Kestrel Airlines", "a cabin crew member"),
    ("Orchard Veterinary Clinic", "a veterinary surgeon"), ("Tidewater Museum", "a curator"),
]
SIB_JOBS = [
    "a pilot", "a dentist", "a carpenter", "a midwife", "a software tester", "a chef", "a park ranger",
    "a physiotherapist", "a journalist", "a firefighter", "an architect", "a barista",
]
PETS = [
    ("greyhound", "dog"), ("beagle", "dog"), ("border collie", "dog"), ("tabby cat", "cat"),
    ("ginger cat", "cat"), ("rabbit", "rabbit"), ("parrot", "parrot"), ("tortoise", "tortoise"),
    ("corgi", "dog"), ("black cat", "cat"),
]
PET_NAMES = "Pixel Biscuit Mango Pepper Olive Ziggy Noodle Clover Bean Juniper Waffle Pickle Luna Sprout".split()
HOBBIES = [
    ("learning the cello", "the cello"), ("bouldering", "bouldering"), ("sourdough baking", "baking"),
    ("birdwatching", "birdwatching"), ("pottery", "pottery"), ("salsa dancing", "salsa"),
    ("restoring old bikes", "bike restoration"), ("chess", "chess"), ("sea swimming", "sea swimming"),
    ("knitting", "knitting"), ("film photography", "photography"), ("playing the drums", "drums"),
]
DIETS = ["vegetarian", "vegan", "pescatarian", "gluten-free", "keto", "dairy-free"]
ALLERGIES = ["peanuts", "shellfish", "cats", "pollen", "penicillin", "kiwi", "sesame"]
BANDS = "Radiohead Fontaines Haim Bonobo Khruangbin Wet Leg Arlo Parks Phoenix Elbow Jungle".split()
PARKS = ["the Peak District", "Snowdonia", "the Lake District", "the Cairngorms", "the Brecon Beacons"]
RESTAURANTS = ["Dishoom", "Bao Bar", "Casa Lola", "the Olive Tree", "Noodle House", "Little Lisbon"]
MOVIES = ["Dune", "Past Lives", "Oppenheimer", "The Holdovers", "Perfect Days", "Anatomy of a Fall"]

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# ---------------------------------------------------------------------------------------------
# Activities: (key, past-tense statement with {when}, question "when did X ...?", month-question noun)
ACTIVITIES = [
    ("half_marathon", ["ran the {city} half marathon {when}", "did the {city} half marathon {when}, finished in just under two hours",
                       "{when_cap} I ran the {city} half marathon, my legs are still sore"],
     "run the {city} half marathon"),
    ("concert", ["went to see {band} live {when}", "{when_cap} I finally saw {band} in concert, what a gig",
                 "caught the {band} show {when}"], "see {band} live"),
    ("hike", ["went hiking in {park} {when}", "{when_cap} we did a long walk in {park}",
              "spent the whole day hiking up in {park} {when}"], "go hiking in {park}"),
    ("dinner", ["had a birthday dinner at {restaurant} {when}", "{when_cap} we celebrated at {restaurant}",
                "ate at {restaurant} {when}, the food was great"], "have dinner at {restaurant}"),
    ("movie", ["saw {movie} at the cinema {when}", "{when_cap} I watched {movie} on the big screen",
               "went to a screening of {movie} {when}"], "watch {movie}"),
    ("vet", ["took {pet} to the vet {when} for vaccinations", "{when_cap} {pet} had a check-up at the vet",
             "had to rush {pet} to the vet {when}"], "take {pet} to the vet"),
    ("interview", ["had a job interview at {company} {when}", "{when_cap} I interviewed with {company}",
                   "did a second-round interview at {company} {when}"], "interview at {company}"),
    ("wedding", ["went to my cousin's wedding in {city2} {when}", "{when_cap} was my cousin's wedding in {city2}",
                 "danced all night at a wedding in {city2} {when}"], "go to the wedding in {city2}"),
    ("dentist", ["finally went to the dentist {when}", "{when_cap} I had a filling done at the dentist",
                 "sat in the dentist's chair for an hour {when}"], "go to the dentist"),
    ("flat_viewing", ["viewed a flat in {city2} {when}", "{when_cap} we looked at an apartment in {city2}",
                      "went to an open house in {city2} {when}"], "view the flat in {city2}"),
]

# Relative phrasings: (text, days before the session) — the event day = session day - offset.
# None = an absolute date phrase, filled in from the event day.
RELATIVE = [
    ("yesterday", 1), ("two days ago", 2), ("three days ago", 3), ("last weekend", None),
    ("on Saturday", None), ("last Sunday", None), ("this morning", 0), ("a week ago", 7),
    ("on {month} {ordinal}", None), ("last Friday", None),
]

# ---------------------------------------------------------------------------------------------
# Fact statements (first person, said by the owner).  {…} filled per person.
SAY = {
    "job": ["I work at {employer} as {role}.", "I'm {role} at {employer}, have been for a few years.",
            "My job? I'm {role}, at {employer}.", "Still at {employer}, doing my thing as {role}.",
            "These days I spend my weeks at {employer}, I'm {role} there."],
    "job_new": ["Big news: I left {old} and started at {employer} as {role}!",
                "I switched jobs, I'm now {role} at {employer}.",
                "First week at {employer} done, being {role} there is so different from {old}.",
                "I handed in my notice at {old}; from Monday I'm {role} with {employer}."],
    "city": ["I live in {city}, near the old docks.", "Home is {city} for me, have been there since uni.",
             "My flat is in {city}, right by the river.", "I'm based in {city}."],
    "city_new": ["We finally moved! I live in {city} now.", "The move to {city} is done, the boxes are everywhere.",
                 "Goodbye {old}, hello {city}: new flat, new life.", "I relocated to {city} last week, still finding my way around."],
    "pet": ["I have a {breed} called {pet}.", "My {breed}, {pet}, chewed my headphones again.",
            "{pet} is my {breed}, the laziest animal alive.", "Adopted a {breed} named {pet} from the shelter a while back."],
    "hobby": ["I've been really into {hobby} lately.", "My weekend thing is {hobby}, it keeps me sane.",
              "Started {hobby} this year and I'm hooked.", "Nothing relaxes me like {hobby}."],
    "sibling": ["My {rel} {sib} is visiting next month.", "I had lunch with my {rel} {sib} today.",
                "My {rel}, {sib}, just turned thirty.", "{sib}, my little {rel}, called me for advice."],
    "sib_job": ["{sib} got a job as {sjob}, we're all so proud.", "{sib} is training to be {sjob} now.",
                "Did I say {sib} works as {sjob}? Crazy hours.", "{sib} finally qualified as {sjob}."],
    "diet": ["I'm {diet} these days.", "I eat {diet}, so I'll check the menu first.", "Being {diet} is easier than I thought."],
    "diet_new": ["Update: I've gone {diet} now, no more {old} for me.", "I switched from {old} to {diet} this month.",
                 "I'm trying {diet} now instead of {old}."],
    "allergy": ["I'm allergic to {allergy}, so be careful.", "Can't have {allergy}, I'm allergic.",
                "My {allergy} allergy flared up again."],
}
ASK = {  # what a friend says before a fact is told: shares the question's words, answers nothing
    "job": ["{p}, what do you do for work again?", "How's work going, {p}?", "{p}, are you still working at the same place?"],
    "city": ["{p}, where are you living these days?", "Is the rent bad where you live, {p}?", "{p}, where's home now?"],
    "pet": ["{p}, how's your pet doing?", "Any pet news, {p}?", "{p}, do you have any animals?"],
    "hobby": ["{p}, what do you do for fun?", "Got any hobbies, {p}?", "What keeps you busy on weekends, {p}?"],
    "sibling": ["How's your family, {p}?", "{p}, do you have siblings?"],
    "sib_job": ["{p}, what's your {rel} up to?", "What does {sib} do these days?"],
    "diet": ["{p}, what do you eat these days?", "Any food restrictions, {p}?"],
    "allergy": ["{p}, anything you can't eat?", "Are you allergic to anything, {p}?"],
}
REACT = ["Oh nice!", "That's great to hear.", "Ha, typical.", "No way!", "Love that.", "Good for you.",
         "Wow, that's a lot.", "Makes sense.", "Oh, I didn't know that.", "Fair enough."]
SMALL_TALK = [
    "Work has been exhausting this week, {q} too?", "The weather in {city} has been grim all week.",
    "I need a holiday, somewhere warm.", "Did anyone watch the match last night?",
    "My cousin works at a hospital, the shifts sound brutal.", "I keep meaning to start running again.",
    "Rent keeps going up everywhere, it's mad.", "Anyone got a good podcast recommendation?",
    "I moved my desk by the window and it helps.", "My neighbour's dog barks all night.",
    "{q}, did you ever finish that book?", "We should do a group dinner soon.",
    "I tried a new recipe and burnt it.", "Coffee is the only thing keeping me going.",
    "{q}, are you coming on Friday?", "Has anyone been to {city} recently?",
    "I think I need a new phone, this one dies by lunch.", "My sister keeps sending me cat videos.",
    "Traffic was a nightmare this morning.", "I'm thinking about learning a language.",
    "The new job market is wild, everyone I know is interviewing.", "I saw a flat advert in {city}, so pricey.",
    "Going to the gym after this.", "Who's up for a hike next month?", "I'm so behind on emails.",
]

QUESTION = {
    "job": ["Where does {p} work?", "What is {p}'s job?", "What does {p} do for a living?", "Who employs {p}?"],
    "job_update": ["Where does {p} work now?", "Who is {p}'s current employer?", "What is {p}'s job these days?"],
    "city": ["Where does {p} live?", "Which city is {p} based in?", "What city is {p}'s home?"],
    "city_update": ["Where does {p} live now?", "Which city did {p} move to?", "Where is {p} living at the moment?"],
    "pet": ["What kind of pet does {p} have?", "What is the name of {p}'s pet?", "Does {p} own an animal?"],
    "hobby": ["What is {p}'s hobby?", "What does {p} do in their free time?", "What is {p} into lately?"],
    "sibling": ["What is the name of {p}'s {rel}?", "Who is {p}'s {rel}?"],
    "diet": ["What does {p} eat?", "Is {p} on a special diet?"],
    "diet_update": ["What diet is {p} on now?", "What does {p} eat these days?"],
    "allergy": ["What is {p} allergic to?", "Does {p} have any allergies?"],
    "hop_sib_job": ["What does {p}'s {rel} do for work?", "What is the job of {p}'s {rel}?"],
    "hop_emp_city": ["Where does the person who works at {employer} live?", "Which city is the {employer} employee from our chat based in?"],
    "hop_pet_hobby": ["What hobby does the owner of {pet} have?", "What does {pet}'s owner do for fun?"],
    "hop_city_pet": ["What pet does the friend who lives in {city} have?", "Whose pet lives in {city}, and what is it called?"],
    "when": ["When did {p} {what}?", "On what date did {p} {what}?", "What day did {p} {what}?"],
    "month": ["What did {p} do in {month}?", "What was {p} up to in {month}?"],
    "last_month": ["What did {p} do last month?", "What was {p} up to last month?"],
}


def _sess(turn_id: str) -> str:
    return turn_id.rsplit("-t", 1)[0]


class Person:
    def __init__(self, name: str, rng: random.Random, used: dict[str, set]) -> None:
        def pick(pool, key):
            choices = [x for x in pool if (x if isinstance(x, str) else x[0]) not in used[key]]
            x = rng.choice(choices)
            used[key].add(x if isinstance(x, str) else x[0])
            return x

        self.name = name
        self.employer, self.role = pick(EMPLOYERS, "employer")
        self.city = pick(CITIES, "city")
        self.breed, _ = rng.choice(PETS)
        self.pet = pick(PET_NAMES, "pet")
        self.hobby, self.hobby_short = pick(HOBBIES, "hobby")
        self.sib = pick(SIBLING_NAMES, "sib")
        self.rel = rng.choice(["brother", "sister"])
        self.sjob = rng.choice(SIB_JOBS)
        self.diet = rng.choice(DIETS)
        self.allergy = rng.choice(ALLERGIES)
        # updates
        self.update = rng.choice(["job", "city", "diet", None, "job", "city"])
        self.new_employer = self.new_role = self.new_city = self.new_diet = None
        if self.update == "job":
            self.new_employer, self.new_role = pick(EMPLOYERS, "employer")
        elif self.update == "city":
            self.new_city = pick(CITIES, "city")
        elif self.update == "diet":
            self.new_diet = rng.choice([d for d in DIETS if d != self.diet])


def make_conversation(ci: int, rng: random.Random, n_sessions: int) -> tuple[dict, list[dict]]:
    n_people = rng.choice([2, 3, 3, 3, 4])
    names = rng.sample(FIRST_NAMES, n_people)
    used: dict[str, set] = {k: set() for k in ("employer", "city", "pet", "hobby", "sib")}
    people = [Person(n, rng, used) for n in names]
    start = dt.date(2025, 1, 6) + dt.timedelta(days=ci * 5 + rng.randrange(0, 4))
    dates = [start]
    for _ in range(n_sessions - 1):
        dates.append(dates[-1] + dt.timedelta(days=rng.randrange(3, 9)))
    asked_at = dates[-1] + dt.timedelta(days=2)

    # Schedule facts: (session index, kind, person).  Updates come late, originals early.
    plan: list[tuple[int, str, Person]] = []
    for p in people:
        kinds = ["job", "city", "pet", "hobby", "sibling", "sib_job", "diet", "allergy"]
        sess = {}
        for k in kinds:
            if k == "sib_job":
                sess[k] = rng.choice([s for s in range(n_sessions) if s != sess["sibling"]])
            elif p.update == k or (p.update == "job" and k == "job"):
                sess[k] = rng.randrange(0, n_sessions // 3)
            else:
                sess[k] = rng.randrange(0, n_sessions)
            plan.append((sess[k], k, p))
        if p.update:
            plan.append((rng.randrange(n_sessions // 2 + 1, n_sessions), p.update + "_new", p))
    # Activities: each person 4-6 dated activities spread over the sessions; some repeat a kind.
    acts: list[tuple[int, str, Person, dict]] = []
    for p in people:
        kinds = rng.sample(ACTIVITIES, 4) + [rng.choice(ACTIVITIES)]
        for a in kinds:
            s = rng.randrange(0, n_sessions)
            fill = {"city": rng.choice(CITIES), "band": rng.choice(BANDS), "park": rng.choice(PARKS),
                    "restaurant": rng.choice(RESTAURANTS), "movie": rng.choice(MOVIES), "pet": p.pet,
                    "company": rng.choice(EMPLOYERS)[0], "city2": rng.choice(CITIES)}
            acts.append((s, a[0], p, {"act": a, "fill": fill}))

    sessions = []
    turn_of: dict[tuple, list[str]] = {}  # (kind, person) -> turn ids
    act_turns: list[tuple[Person, str, dict, str, dt.date]] = []
    for si, day in enumerate(dates):
        sid = f"c{ci:02d}-s{si:02d}"
        turns: list[dict] = []

        def add(speaker: str, text: str, **extra) -> str:
            tid = f"{sid}-t{len(turns) + 1:02d}"
            turns.append({"id": tid, "speaker": speaker, "text": text, **extra})
            return tid

        others = lambda p: [q for q in people if q is not p]  # noqa: E731
        greet = rng.choice(people)
        add(greet.name, rng.choice(["Morning all!", "Hey everyone.", "Hi hi, long week.", "Evening, folks!",
                                     f"Hey {rng.choice(others(greet)).name}, you around?"]))
        events = [("fact", k, p, None) for s, k, p in plan if s == si]
        events += [("act", k, p, d) for s, k, p, d in acts if s == si]
        rng.shuffle(events)
        for kind, k, p, d in events:
            friend = rng.choice(others(p))
            if kind == "fact":
                base = k.replace("_new", "")
                if rng.random() < 0.6 and base in ASK:
                    add(friend.name, rng.choice(ASK[base]).format(p=p.name, rel=p.rel, sib=p.sib))
                fill = dict(employer=p.employer, role=p.role, city=p.city, breed=p.breed, pet=p.pet,
                            hobby=p.hobby, sib=p.sib, rel=p.rel, sjob=p.sjob, diet=p.diet, allergy=p.allergy)
                if k == "job_new":
                    fill.update(employer=p.new_employer, role=p.new_role, old=p.employer)
                elif k == "city_new":
                    fill.update(city=p.new_city, old=p.city)
                elif k == "diet_new":
                    fill.update(diet=p.new_diet, old=p.diet)
                text = rng.choice(SAY[k]).format(**fill)
                tid = add(p.name, text)
                turn_of.setdefault((k, p.name), []).append(tid)
                if rng.random() < 0.7:
                    add(friend.name, rng.choice(REACT))
                if rng.random() < 0.35:  # a distractor: the friend states the same kind of fact
                    if base == "job":
                        add(friend.name, f"My {rng.choice(['cousin', 'flatmate', 'uncle'])} works at {rng.choice(EMPLOYERS)[0]}, similar job.")
                    elif base == "city":
                        add(friend.name, f"I almost moved to {rng.choice(CITIES)} once, the rent was too high.")
                    elif base == "pet":
                        add(friend.name, f"My neighbour's {rng.choice(PETS)[0]} is called {rng.choice(PET_NAMES)} too, funny.")
                    elif base == "hobby":
                        add(friend.name, f"I tried {rng.choice(HOBBIES)[0]} once and gave up after a week.")
                    elif base == "diet":
                        add(friend.name, f"I was {rng.choice(DIETS)} for a year, never again.")
            else:
                act, fill = d["act"], d["fill"]
                rel_text, off = rng.choice(RELATIVE)
                if off is None:
                    if rel_text in ("last weekend", "on Saturday"):
                        # the most recent Saturday strictly before the session day
                        off = (day.weekday() - 5) % 7 or 7
                    elif rel_text == "last Sunday":
                        off = (day.weekday() - 6) % 7 or 7
                    elif rel_text == "last Friday":
                        off = (day.weekday() - 4) % 7 or 7
                    else:
                        off = rng.randrange(4, 12)
                event_day = day - dt.timedelta(days=off)
                when = rel_text.format(month=MONTHS[event_day.month - 1], ordinal=ordinal(event_day.day))
                text = rng.choice(act[1]).format(when=when, when_cap=when[:1].upper() + when[1:], **fill)
                if not text[:1].isupper():
                    text = rng.choice(["Oh, and I ", "So I ", "I "]) + text
                text = text.rstrip(".") + "."
                if rng.random() < 0.4:
                    add(friend.name, rng.choice([f"What did you get up to, {p.name}?", f"{p.name}, how was your week?",
                                                 "Anyone do anything fun recently?"]))
                tid = add(p.name, text, event_date=event_day.isoformat())
                act_turns.append((p, act[0], fill, tid, event_day))
                if rng.random() < 0.6:
                    add(friend.name, rng.choice(REACT))
        for _ in range(rng.randrange(2, 5)):
            sp = rng.choice(people)
            add(sp.name, rng.choice(SMALL_TALK).format(q=rng.choice(others(sp)).name, city=rng.choice(CITIES)))
        sessions.append({"session_id": sid, "date": day.isoformat(), "turns": turns})

    # ------------------------------------------------------------------ questions
    qs: list[dict] = []

    def q(category: str, text: str, evidence: list[str], answer: str, stale: list[str] | None = None) -> None:
        qs.append({"category": category, "question": text, "evidence": evidence, "answer": answer,
                   "stale": stale or [], "asked_at": asked_at.isoformat()})

    for p in people:
        ev = lambda k: turn_of.get((k, p.name), [])  # noqa: E731
        fmt = dict(p=p.name, rel=p.rel)
        # single hop: facts that never changed
        for k, ans in (("job", f"{p.role} at {p.employer}"), ("city", p.city), ("pet", f"{p.breed} {p.pet}"),
                       ("hobby", p.hobby), ("sibling", p.sib), ("diet", p.diet), ("allergy", p.allergy)):
            if p.update == k:
                continue
            if k in ("diet", "allergy") and rng.random() < 0.5:
                continue
            q("single_hop", rng.choice(QUESTION[k]).format(**fmt), ev(k), ans)
        # knowledge update
        if p.update:
            k = p.update
            ans = {"job": f"{p.new_role} at {p.new_employer}", "city": p.new_city, "diet": p.new_diet}[k]
            q("knowledge_update", rng.choice(QUESTION[k + "_update"]).format(**fmt), ev(k + "_new"), ans, stale=ev(k))
        # multi hop (the two turns are in different sessions by construction or by check)
        q("multi_hop", rng.choice(QUESTION["hop_sib_job"]).format(**fmt), ev("sibling") + ev("sib_job"), p.sjob)
        if p.update not in ("job", "city") and _sess(ev("job")[0]) != _sess(ev("city")[0]):
            q("multi_hop", rng.choice(QUESTION["hop_emp_city"]).format(employer=p.employer), ev("job") + ev("city"), p.city)
        if _sess(ev("pet")[0]) != _sess(ev("hobby")[0]):
            q("multi_hop", rng.choice(QUESTION["hop_pet_hobby"]).format(pet=p.pet), ev("pet") + ev("hobby"), p.hobby)
        elif p.update != "city" and _sess(ev("city")[0]) != _sess(ev("pet")[0]):
            q("multi_hop", rng.choice(QUESTION["hop_city_pet"]).format(city=p.city), ev("city") + ev("pet"), p.pet)
        # temporal: "when did X …" for activities that X did once
        mine = [a for a in act_turns if a[0] is p]
        kinds_once = [a for a in mine if sum(1 for b in mine if b[1] == a[1]) == 1]
        for a in rng.sample(kinds_once, min(2, len(kinds_once))):
            act = next(x for x in ACTIVITIES if x[0] == a[1])
            q("temporal", rng.choice(QUESTION["when"]).format(p=p.name, what=act[2].format(**a[2])), [a[3]],
              a[4].isoformat())
        # temporal: "what did X do in <month> / last month" — every activity of X that month
        by_month: dict[tuple[int, int], list] = {}
        for a in mine:
            by_month.setdefault((a[4].year, a[4].month), []).append(a)
        if len(by_month) >= 2:
            last = (asked_at.replace(day=1) - dt.timedelta(days=1))
            key = (last.year, last.month)
            if key in by_month and rng.random() < 0.6:
                q("temporal", rng.choice(QUESTION["last_month"]).format(p=p.name), [a[3] for a in by_month[key]],
                  MONTHS[key[1] - 1])
            else:
                key = rng.choice(sorted(by_month))
                q("temporal", rng.choice(QUESTION["month"]).format(p=p.name, month=MONTHS[key[1] - 1]),
                  [a[3] for a in by_month[key]], MONTHS[key[1] - 1])
    conv = {"conversation_id": f"c{ci:02d}", "people": [p.name for p in people], "sessions": sessions}
    return conv, qs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=20261130)
    ap.add_argument("--conversations", type=int, default=18)
    ap.add_argument("--sessions", type=int, default=12)
    ap.add_argument("--dev", type=int, default=6, help="conversations in the dev split; the rest are test")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    convs, questions = [], []
    for ci in range(args.conversations):
        conv, qs = make_conversation(ci, rng, args.sessions)
        split = "dev" if ci < args.dev else "test"
        conv["split"] = split
        convs.append(conv)
        for i, qq in enumerate(qs):
            questions.append({"id": f"{conv['conversation_id']}-q{i + 1:02d}", "conversation_id": conv["conversation_id"],
                              "split": split, **qq})
    with open(HERE / "quality_conversations.jsonl", "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps(c, ensure_ascii=False, sort_keys=True) + "\n")
    with open(HERE / "quality_questions.jsonl", "w", encoding="utf-8") as f:
        for qq in questions:
            f.write(json.dumps(qq, ensure_ascii=False, sort_keys=True) + "\n")
    n_turns = sum(len(s["turns"]) for c in convs for s in c["sessions"])
    cats: dict[str, int] = {}
    for qq in questions:
        cats[f"{qq['split']}/{qq['category']}"] = cats.get(f"{qq['split']}/{qq['category']}", 0) + 1
    print(f"{len(convs)} conversations, {n_turns} turns, {len(questions)} questions: {dict(sorted(cats.items()))}")


if __name__ == "__main__":
    main()
