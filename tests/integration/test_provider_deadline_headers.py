"""Providers (stop 21): a provider's timeout bounds the whole exchange, the response headers
included, for Anthropic, OpenAI chat and OpenAI embeddings, sync and async."""

from __future__ import annotations

import dataclasses

import pytest
from test_round5_surfaces import PATHS, _good_reply, _provider, _run

import umi


@pytest.mark.parametrize("kind", ["anthropic", "embeddings", "openai"])
def test_an_answer_whose_headers_trickle_in_past_the_timeout_is_a_provider_timeout(api, closing, mode, kind):
    """httpx's read timeout restarts with every chunk, and the deadline under the SDK clients
    bounded only the body: headers sent one byte every 0.05 s held a call with timeout=0.5 until
    they were all in (8.5 s with timeout=1), and only the body's check then gave up. The timeout
    now bounds the whole exchange: the client hangs up while the headers (≈ 15 s of them here)
    are still coming in. Times are not asserted: the server says whether the client left early."""
    good = _good_reply(kind)
    slow = {"x-padding": "p" * 200}  # ≈ 300 header bytes in all: ≈ 15 s at 0.05 s a byte
    api.script(PATHS[kind], lambda rec: dataclasses.replace(good(rec), headers=slow, header_trickle_secs=0.05))
    p = _provider(kind, api, closing, timeout=0.5, max_retries=0)
    with pytest.raises(umi.ProviderTimeoutError, match="0.5 s timeout, after 1 attempt"):
        _run(kind, p, mode)
    assert api.hung_up_in_headers.wait(60)  # not only once the headers were all in
    assert len(api.requests_to(PATHS[kind])) == 1
    api.script(PATHS[kind], good)  # the same answer sent at once is fine, on the same provider
    assert _run(kind, p, mode) is not None
