"""The LangGraph example agent (examples/langgraph_agent.py), run with a fake chat model from
langchain_core that records every prompt it is given: what one user told the agent reaches the
model's prompt in a later conversation, and never another user's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langgraph", reason="the langgraph extra is not installed")

from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel  # noqa: E402
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage  # noqa: E402
from pydantic import Field  # noqa: E402

import umi  # noqa: E402
from umi.integrations.langgraph import UmiStore  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "langgraph_agent.py"


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("langgraph_agent_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class RecordingChatModel(FakeMessagesListChatModel):
    """Answers from a script and keeps every prompt it was sent."""

    prompts: list[list[BaseMessage]] = Field(default_factory=list)

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        self.prompts.append(list(messages))
        return super()._generate(messages, *args, **kwargs)


def test_the_agent_remembers_per_user_across_conversations():
    example = load_example()
    model = RecordingChatModel(responses=[AIMessage("Noted."), AIMessage("Green tea."), AIMessage("No idea.")])
    with umi.Memory.sim(seed=5) as memory:
        graph = example.build_graph(model, UmiStore(memory, user_level=1))

        def say(user: str, text: str) -> str:
            out = graph.invoke({"messages": [HumanMessage(text)]}, context=example.Context(user_id=user))
            return out["messages"][-1].content

        assert say("alice", "I drink green tea every morning.") == "Noted."
        assert "(nothing yet)" in model.prompts[0][0].content
        assert say("alice", "What do I like to drink?") == "Green tea."
        assert "- I drink green tea every morning." in model.prompts[1][0].content
        assert say("bob", "What do I like to drink?") == "No idea."
        assert "green tea" not in model.prompts[2][0].content  # Alice's memory is not Bob's

        # the store kept statements only, each in its user's scope
        alice = memory.scoped(user_id="alice")
        hits = alice.recall_sync("green tea")
        assert [e.content for e in hits] == ['{"text": "I drink green tea every morning."}']
        assert memory.scoped(user_id="bob").recall_sync("green tea") == []


def test_the_example_script_runs_offline(capsys):
    load_example().main()
    out = capsys.readouterr().out
    assert "alice: What do I like to drink?\n  agent: You like green tea." in out
    assert "umi sees Alice's memory too: [" in out and "drink green tea every morning" in out.splitlines()[-1]
