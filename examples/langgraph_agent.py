"""A LangGraph chat agent whose long-term memory is umi, through UmiStore (pip install 'umi[langgraph]').

Each user's memories live in the namespace ("memories", <user_id>), which UmiStore maps onto
umi's scope user_id=<user_id>: one user's agent never sees another's, and the same facts are
there for umi's own API (memory.scoped(user_id=...).recall(...)).

The graph: `agent` looks up what it remembers about the user (a store search, served by umi's
recall) and answers with that in its system prompt; `remember` keeps what the user stated.

Runs offline as it is, with a scripted chat model standing in for a real one. To use a real
model, pass any LangChain chat model to build_graph(), e.g.
`langchain_anthropic.ChatAnthropic(model="claude-sonnet-4-5")`.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass

from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.runtime import Runtime

import umi
from umi.integrations.langgraph import UmiStore


@dataclass
class Context:
    user_id: str


def build_graph(model: BaseChatModel, store: UmiStore):
    def agent(state: MessagesState, runtime: Runtime[Context]) -> dict:
        question = state["messages"][-1].content
        found = runtime.store.search(("memories", runtime.context.user_id), query=question, limit=3)
        known = "\n".join(f"- {item.value['text']}" for item in found) or "- (nothing yet)"
        system = SystemMessage(f"You are a helpful assistant. What you remember about this user:\n{known}")
        return {"messages": [model.invoke([system, *state["messages"]])]}

    def remember(state: MessagesState, runtime: Runtime[Context]) -> dict:
        said = next(m for m in reversed(state["messages"]) if isinstance(m, HumanMessage)).content
        if not said.rstrip().endswith("?"):  # statements are worth keeping; questions are not
            runtime.store.put(("memories", runtime.context.user_id), str(uuid.uuid4()), {"text": said})
        return {}

    return (StateGraph(MessagesState, context_schema=Context)
            .add_node("agent", agent)
            .add_node("remember", remember)
            .add_edge(START, "agent")
            .add_edge("agent", "remember")
            .add_edge("remember", END)
            .compile(store=store))


def main() -> None:
    scripted = FakeMessagesListChatModel(responses=[
        AIMessage("Nice to meet you, Alice! Green tea it is."),
        AIMessage("You like green tea."),
        AIMessage("I don't know yet - tell me!"),
    ])
    with tempfile.TemporaryDirectory() as tmp, umi.Memory(os.path.join(tmp, "agent.duckdb")) as memory:
        graph = build_graph(scripted, UmiStore(memory, user_level=1))
        turns = [("alice", "I'm Alice and I drink green tea every morning."),
                 ("alice", "What do I like to drink?"),
                 ("bob", "What do I like to drink?")]
        for user, text in turns:
            out = graph.invoke({"messages": [HumanMessage(text)]}, context=Context(user_id=user))
            print(f"{user}: {text}\n  agent: {out['messages'][-1].content}")
        alice = memory.scoped(user_id="alice")
        print("umi sees Alice's memory too:", [e.content for e in alice.recall_sync("drink")][:1])


if __name__ == "__main__":
    main()
