"""UmiStore against LangGraph's own InMemoryStore: same calls, same observable results.

The reference store gets the same embedder as the umi Memory (the Sim embedder), so a query
search means the same thing to both. Where the two may differ by design it is said, and the test
checks what must still hold:
* listing order without a query is not part of BaseStore's contract (InMemoryStore groups by
  namespace, umi lists oldest first): listings are compared as sets, pages must tile the listing;
* umi's search is hybrid recall (vectors + BM25 + names, fused): for a query, the best item and
  the set under a limit that covers every match are compared, not the whole ranking;
* timestamps come from each store's own clock: only their order is compared.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("langgraph", reason="the langgraph extra is not installed")

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule  # noqa: E402
from langgraph.store.base import GetOp, InvalidNamespaceError, ListNamespacesOp, PutOp, SearchOp  # noqa: E402
from langgraph.store.memory import InMemoryStore  # noqa: E402

import umi  # noqa: E402
from umi.integrations.langgraph import UmiStore  # noqa: E402

DOCS: list[tuple[tuple[str, ...], str, dict[str, Any]]] = [
    (("memories", "alice"), "job", {"text": "Alice is a software engineer at Acme Corp.", "kind": "fact", "n": 3}),
    (("memories", "alice"), "pet", {"text": "Alice has a grey cat called Miso.", "kind": "fact", "n": 7}),
    (("memories", "alice"), "tea", {"text": "Alice drinks green tea every morning.", "kind": "pref", "n": 1,
                                    "tags": ["drink", "morning"], "meta": {"source": "chat", "turn": 2}}),
    (("memories", "bob"), "home", {"text": "Bob lives in Berlin near the river.", "kind": "fact", "n": 5}),
    (("memories", "bob"), "sport", {"text": "Bob goes climbing on weekends.", "kind": "pref", "n": 9.5}),
    (("memories", "bob", "drafts"), "d1", {"text": "Bob might move to Lisbon.", "kind": "draft"}),
    (("docs",), "readme", {"text": "The quarterly report is due on Friday.", "kind": "doc", "n": 4}),
    (("docs", "v1"), "readme", {"text": "The quarterly report is due on Friday.", "kind": "doc", "n": 4}),
]


def keys(items: list[Any]) -> list[tuple[tuple[str, ...], str]]:
    return [(tuple(i.namespace), i.key) for i in items]


def same_items(a: list[Any], b: list[Any]) -> None:
    assert sorted(keys(a)) == sorted(keys(b))
    by_key = {(tuple(i.namespace), i.key): i.value for i in b}
    for item in a:
        assert item.value == by_key[(tuple(item.namespace), item.key)]


@pytest.fixture
def memory():
    mem = umi.Memory.sim(seed=11)
    yield mem
    mem.close()


@pytest.fixture
def stores(memory):
    embed = memory.embedder

    def embed_texts(texts: list[str]) -> list[list[float]]:
        return embed.embed(texts).tolist()

    ref = InMemoryStore(index={"dims": embed.dim, "embed": embed_texts})
    ours = UmiStore(memory)
    for ns, key, value in DOCS:
        ref.put(ns, key, value)
        ours.put(ns, key, value)
    return ours, ref


@pytest.fixture(scope="module")
def semantic_stores():
    """Both stores over the offline local embedder: query rankings mean something here."""
    emb = umi.LocalEmbeddingProvider()
    mem = umi.MemoryBuilder().with_embedder(emb).with_storage(umi.SimStorageBackend(seed=1)).build()
    ref = InMemoryStore(index={"dims": emb.dim, "embed": lambda texts: emb.embed(texts).tolist()})
    ours = UmiStore(mem)
    for ns, key, value in DOCS:
        ref.put(ns, key, value)
        ours.put(ns, key, value)
    yield ours, ref
    mem.close()


def test_get_put_update_delete_match_the_reference(stores):
    ours, ref = stores
    for ns, key, _ in DOCS:
        a, b = ours.get(ns, key), ref.get(ns, key)
        assert a is not None and a.value == b.value and a.key == b.key and a.namespace == b.namespace
    assert ours.get(("memories", "alice"), "nope") is None and ref.get(("memories", "alice"), "nope") is None
    assert ours.get(("memories",), "job") is None  # a key lives in exactly one namespace
    before = ours.get(("memories", "alice"), "job")
    for store in (ours, ref):
        store.put(("memories", "alice"), "job", {"text": "Alice now leads the Apollo project.", "kind": "fact"})
    after = ours.get(("memories", "alice"), "job")
    assert after.value == ref.get(("memories", "alice"), "job").value
    assert after.created_at == before.created_at and after.updated_at > before.updated_at
    for store in (ours, ref):
        store.delete(("memories", "alice"), "job")
        store.delete(("memories", "alice"), "never-there")  # deleting nothing is fine
    assert ours.get(("memories", "alice"), "job") is None and ref.get(("memories", "alice"), "job") is None
    # the same key again after a delete is a fresh item
    for store in (ours, ref):
        store.put(("memories", "alice"), "job", {"text": "Alice is back at Acme."})
    assert ours.get(("memories", "alice"), "job").value == {"text": "Alice is back at Acme."}


def test_search_without_query_lists_the_same_items(stores):
    ours, ref = stores
    for prefix in [(), ("memories",), ("memories", "bob"), ("docs",), ("nothing",)]:
        same_items(ours.search(prefix, limit=100), ref.search(prefix, limit=100))
    # pages tile the listing: disjoint, in order, covering every item
    full = ours.search((), limit=100)
    paged = [it for off in range(0, len(full), 3) for it in ours.search((), limit=3, offset=off)]
    assert keys(paged) == keys(full) and len(full) == len(DOCS)
    assert ours.search((), limit=0) == [] and ours.search((), offset=len(DOCS)) == []


@pytest.mark.parametrize("flt", [
    {"kind": "fact"},
    {"kind": "pref", "n": 1},
    {"n": {"$gt": 4}},
    {"n": {"$gt": 3}},   # boundaries: alice's n are 1, 3, 7
    {"n": {"$lte": 3}},
    {"n": {"$gte": 3, "$lt": 9}},
    {"kind": {"$ne": "fact"}},
    {"kind": {"$eq": "doc"}},
    {"tags": ["drink", "morning"]},
    {"meta": {"source": "chat"}},
    {"kind": "nothing-matches"},
])
def test_filters_select_the_same_items(stores, flt):
    ours, ref = stores
    # comparisons only where every item has the field: InMemoryStore raises TypeError on a
    # missing one (float(None)); umi treats a missing field as not matching
    prefix = ("memories", "alice") if "n" in flt else ()
    same_items(ours.search(prefix, filter=flt, limit=100), ref.search(prefix, filter=flt, limit=100))
    # with a query too: the same set, when the limit covers every match
    same_items(ours.search(prefix, query="Alice", filter=flt, limit=100),
               ref.search(prefix, query="Alice", filter=flt, limit=100))


@pytest.mark.parametrize(("query", "expected"), [
    ("Where does Bob live?", (("memories", "bob"), "home")),
    ("Who has a cat?", (("memories", "alice"), "pet")),
    ("green tea in the morning", (("memories", "alice"), "tea")),
    ("climbing weekends", (("memories", "bob"), "sport")),
])
def test_query_search_finds_what_the_reference_finds(semantic_stores, query, expected):
    ours, ref = semantic_stores
    mine, theirs = ours.search(("memories",), query=query, limit=3), ref.search(("memories",), query=query, limit=3)
    assert keys(mine)[0] == keys(theirs)[0] == expected
    assert mine[0].score is not None and mine[0].score >= mine[-1].score
    # limit counts items; offset skips the best ones
    assert keys(ours.search(("memories",), query=query, limit=2, offset=1)) == keys(mine)[1:3]
    # the prefix bounds the search
    assert all(i.namespace[:2] == ("memories", "bob")
               for i in ours.search(("memories", "bob"), query=query, limit=10))


def test_list_namespaces_matches_the_reference(stores):
    ours, ref = stores
    cases: list[dict[str, Any]] = [
        {}, {"prefix": ("memories",)}, {"prefix": ("memories", "*")}, {"suffix": ("v1",)},
        {"suffix": ("*",)}, {"prefix": ("memories",), "suffix": ("drafts",)},
        {"max_depth": 1}, {"max_depth": 2, "prefix": ("memories",)}, {"limit": 2}, {"limit": 2, "offset": 2},
        {"prefix": ("nothing",)},
    ]
    for kwargs in cases:
        assert ours.list_namespaces(**kwargs) == ref.list_namespaces(**kwargs), kwargs


def test_a_batch_reads_before_it_writes_like_the_reference(stores):
    ours, ref = stores
    ns = ("memories", "alice")
    ops = [
        PutOp(ns, "pet", {"text": "Alice's cat Miso is now three."}),
        GetOp(ns, "pet"),
        PutOp(ns, "new", {"text": "first"}),
        PutOp(ns, "new", {"text": "second"}),  # the last put of a key wins
        SearchOp(ns, filter={"text": "second"}),
        ListNamespacesOp(max_depth=1),
        PutOp(ns, "tea", None),
    ]
    mine, theirs = ours.batch(ops), ref.batch(ops)
    assert mine[1].value == theirs[1].value == DOCS[1][2]  # the value before the batch
    assert mine[4] == theirs[4] == []
    assert mine[5] == theirs[5]
    for key in ("pet", "new", "tea"):
        a, b = ours.get(ns, key), ref.get(ns, key)
        assert (a and a.value) == (b and b.value), key


async def test_async_faces_match_the_sync_ones(stores):
    ours, ref = stores
    ns = ("memories", "carol")
    for store in (ours, ref):
        await store.aput(ns, "job", {"text": "Carol manages the Apollo project.", "kind": "fact"})
    assert (await ours.aget(ns, "job")).value == (await ref.aget(ns, "job")).value
    same_items(await ours.asearch(("memories",), filter={"kind": "fact"}, limit=100),
               await ref.asearch(("memories",), filter={"kind": "fact"}, limit=100))
    found = await ours.asearch(("memories",), query="Who manages Apollo?", limit=1)
    assert keys(found) == [(ns, "job")]
    assert await ours.alist_namespaces(prefix=("memories",)) == await ref.alist_namespaces(prefix=("memories",))
    results = await asyncio.gather(*(ours.abatch([GetOp(ns, "job")]) for _ in range(4)))
    assert all(r[0].value["kind"] == "fact" for r in results)
    for store in (ours, ref):
        await store.adelete(ns, "job")
    assert await ours.aget(ns, "job") is None


def test_bad_input_is_refused_like_the_reference(stores):
    ours, ref = stores
    for store in (ours, ref):
        with pytest.raises(InvalidNamespaceError):
            store.put(("a.b",), "k", {"x": 1})
        with pytest.raises(InvalidNamespaceError):
            store.put((), "k", {"x": 1})
        with pytest.raises(InvalidNamespaceError):
            store.put(("langgraph",), "k", {"x": 1})
        with pytest.raises(InvalidNamespaceError):
            store.get(("",), "k")
        with pytest.raises(NotImplementedError):
            store.put(("a",), "k", {"x": 1}, ttl=5)
    with pytest.raises(InvalidNamespaceError):  # ops handed to batch directly are checked too
        ours.batch([GetOp(("a.b",), "k")])
    with pytest.raises(TypeError, match="not JSON serializable"):
        ours.put(("a",), "k", {"x": object()})
    with pytest.raises(umi.InvalidLimitError):
        ours.search(("a",), limit=-1)
    with pytest.raises(umi.InvalidLimitError, match="best 100 items"):
        ours.search(("a",), query="x", limit=50, offset=60)
    # a missing field never matches a comparison (InMemoryStore raises TypeError instead)
    assert keys(ours.search(("memories", "bob"), filter={"n": {"$gt": 0}}, limit=10)) == [
        (("memories", "bob"), "home"), (("memories", "bob"), "sport")]
    with pytest.raises(umi.InvalidFilterError, match=r"\$regex"):
        ours.search(("memories",), filter={"kind": {"$regex": "f.*"}})
    with pytest.raises(umi.InvalidConfigError, match="namespace position"):
        UmiStore(ours.memory, user_level=-1)
    # nothing half-written: a failing batch leaves the store as it was
    before = ours.search((), limit=100)
    with pytest.raises(TypeError):
        ours.batch([PutOp(("a",), "ok", {"x": 1}), PutOp(("a",), "bad", {"x": object()})])
    assert keys(ours.search((), limit=100)) == keys(before)


def test_items_are_umi_facts(memory, stores):
    ours, _ = stores
    # the store's first write recorded the embedder, as any Memory write does
    from umi._engine import embedder_identity

    assert memory.storage.get_meta("embedder") == embedder_identity(memory.embedder)
    # the Memory's own recall sees what the store holds, as notes, with history
    hits = memory.recall_sync("Where does Bob live?", umi.RecallOptions(limit=3))
    assert hits and hits[0].entity_type == umi.EntityType.NOTE and "Berlin" in hits[0].content
    ours.put(("memories", "bob"), "home", {"text": "Bob moved to Lisbon."})
    entity_id = ours._item_id({}, ("memories", "bob"), "home")
    assert [h.op for h in memory.history_sync(entity_id)][:2] == ["create", "update"]
    ours.delete(("memories", "bob"), "home")
    assert memory.get_sync(entity_id) is None
    assert all("Lisbon" not in e.content or e.metadata.get("langgraph.key") != "home"
               for e in memory.recall_sync("Lisbon", umi.RecallOptions(limit=10)))


# --- scopes: namespaces map onto umi scopes ---------------------------------------------------
def test_namespace_levels_become_scopes(memory):
    store = UmiStore(memory, user_level=1)
    store.put(("memories", "alice"), "pet", {"text": "Alice has a grey cat called Miso."})
    store.put(("memories", "bob"), "pet", {"text": "Bob has a dog called Rex."})
    alice, bob = memory.scoped(user_id="alice"), memory.scoped(user_id="bob")
    assert [e.content for e in alice.recall_sync("Who has a pet?")] == ['{"text": "Alice has a grey cat called Miso."}']
    assert all("Alice" not in e.content for e in bob.recall_sync("grey cat Miso"))
    # a store over Alice's view sees only Alice's namespace, and cannot write Bob's
    mine = UmiStore(alice, user_level=1)
    assert keys(mine.search(("memories",), limit=10)) == [(("memories", "alice"), "pet")]
    assert mine.get(("memories", "alice"), "pet").value == {"text": "Alice has a grey cat called Miso."}
    with pytest.raises(umi.InvalidConfigError, match="scoped to user_id 'alice'"):
        mine.put(("memories", "bob"), "x", {"text": "sneaky"})
    with pytest.raises(umi.InvalidScopeError):
        store.put(("memories", "not a valid id!"), "x", {"text": "x"})


# --- a model-based property test: random operation sequences against InMemoryStore -----------
NAMESPACES = [("a",), ("a", "x"), ("a", "y"), ("b",), ("b", "x", "z")]
KEYS = ["k1", "k2", "k3"]
VALUES = st.fixed_dictionaries({
    "text": st.sampled_from(["red apple", "green pear", "blue sky", "red sky at night"]),
    "n": st.integers(0, 5),
    "kind": st.sampled_from(["p", "q"]),
})


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.memory = umi.Memory.sim(seed=3)
        self.ours = UmiStore(self.memory)
        self.ref = InMemoryStore()

    @rule(ns=st.sampled_from(NAMESPACES), key=st.sampled_from(KEYS), value=VALUES)
    def put(self, ns, key, value):
        self.ours.put(ns, key, value)
        self.ref.put(ns, key, value)

    @rule(ns=st.sampled_from(NAMESPACES), key=st.sampled_from(KEYS))
    def delete(self, ns, key):
        self.ours.delete(ns, key)
        self.ref.delete(ns, key)

    @rule(ns=st.sampled_from(NAMESPACES), key=st.sampled_from(KEYS))
    def get(self, ns, key):
        a, b = self.ours.get(ns, key), self.ref.get(ns, key)
        assert (a and a.value) == (b and b.value)

    @rule(prefix=st.sampled_from([(), ("a",), ("b",), ("a", "x")]),
          flt=st.sampled_from([None, {"kind": "p"}, {"n": {"$gte": 3}}, {"n": {"$gt": 3}}, {"n": {"$lt": 2}},
                               {"n": {"$ne": 2}}, {"kind": "q", "n": 2}]))
    def search(self, prefix, flt):
        same_items(self.ours.search(prefix, filter=flt, limit=100),
                   self.ref.search(prefix, filter=flt, limit=100))

    @invariant()
    def namespaces_agree(self):
        # InMemoryStore keeps a namespace after its last item is deleted (and creates one on a
        # get); umi lists the namespaces that hold items, as LangGraph's Postgres store does.
        live = sorted({tuple(i.namespace) for i in self.ref.search((), limit=1000)})
        assert self.ours.list_namespaces(limit=1000) == live

    def teardown(self) -> None:
        self.memory.close()


StoreMachine.TestCase.settings = settings(max_examples=15, stateful_step_count=12, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_random_operation_sequences_match_the_reference = StoreMachine.TestCase
