"""The Ray layer on a real local cluster: 2 sandbox actors (0.25 CPU each), sticky handles, tools that are
Ray actor methods, handles used from other Ray workers."""

from __future__ import annotations

import asyncio
import time

import pytest


@pytest.fixture(scope="module")
def pool(ray_sandbox_cluster):
    from raydistill.actors.sandbox_pool import SandboxPool

    p = SandboxPool(num_actors=2, num_cpus_per_actor=0.25, step_timeout_s=10)
    yield p
    p.shutdown()


@pytest.fixture(scope="module")
def retriever(ray_sandbox_cluster):
    import ray

    @ray.remote(num_cpus=0.1)
    class Retriever:
        def __init__(self):
            self.queries = []

        async def search(self, query: str) -> str:
            self.queries.append(query)
            return f"===== Document 1, similarity: 0.91 =====\nAbout {query}"

        def seen(self) -> list[str]:
            return self.queries

    return Retriever.remote()


def test_persistent_sticky_sandboxes_with_ray_tools(pool, retriever):
    import ray

    from raydistill.actors.sandbox_pool import RayActorTool

    async def main():
        a = await pool.create(tools={"web_search": retriever.search})
        b = await pool.create(tools={"web_search": RayActorTool(retriever, "search"), "double": lambda x: 2 * x})
        assert a.isolation_level in ("bwrap", "seccomp")
        r1 = await a.arun("x = web_search('Paris')\nprint(x.splitlines()[1])")
        r2 = await b.arun("y = double(21)\nweb_search('Rome')[:5]")
        assert r1.ok and r1.stdout == "About Paris\n", r1
        assert r2.ok and r2.value == "'====='", r2
        assert (await a.arun("len(x) > 10")).value == "True"  # state lives on a's actor
        assert (await b.arun("y")).value == "42"
        child = await a.afork()
        assert child.actor == a.actor  # forks stay next to their parent's state
        assert (await child.arun("x = 'changed'; x")).value == "'changed'"
        assert (await a.arun("x.startswith('=====')")).value == "True"
        many = await asyncio.gather(*(pool.create() for _ in range(6)))
        assert {id(h.actor) for h in many} | {id(a.actor), id(b.actor)}  # spread over actors
        outs = await asyncio.gather(*(h.arun(f"{i} ** 2") for i, h in enumerate(many)))
        assert [o.value for o in outs] == [str(i * i) for i in range(6)]
        stats = await pool.stats()
        assert sum(s["sandboxes"] for s in stats) == 9 and all(s["sandboxes"] > 0 for s in stats)
        for h in [a, b, child, *many]:
            await h.aclose()
        assert sum(s["sandboxes"] for s in await pool.stats()) == 0
        return await retriever.seen.remote()

    seen = asyncio.run(main())
    assert seen == ["Paris", "Rome"]
    with pytest.raises(Exception, match="not on this actor"):
        h = pool.create_sync()
        h.close()
        h._closed = False
        h.run("1")
    assert ray.is_initialized()


def test_handles_work_from_other_workers(pool):
    import ray

    h = pool.create_sync()
    h.run("counter = 0")

    @ray.remote(num_cpus=0.1)
    def bump(handle, times):
        return [handle.run("counter += 1\ncounter").value for _ in range(times)]

    assert ray.get(bump.remote(h, 3)) == ["1", "2", "3"]
    assert h.run("counter").value == "3"
    f = h.fork()
    assert f.run("counter").value == "3"
    f.close()
    h.close()


def test_pool_survives_hostile_code(pool):
    async def main():
        h = await pool.create()
        await h.arun("keep = 1")
        r = await h.arun("[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'catch_warnings']"
                         "[0]()._module.__builtins__['__import__']('os')._exit(1)")
        assert r.restored and r.error_type == "crash"
        assert (await h.arun("keep")).value == "1"
        await h.aclose()

    asyncio.run(main())


def test_tools_are_shipped_once_per_actor_and_again_after_a_restart(ray_sandbox_cluster, retriever):
    import ray

    from raydistill.actors.sandbox_pool import RayActorTool, SandboxPool

    class Counting(RayActorTool):  # counts how often the tool is pickled, i.e. shipped to an actor
        shipped = 0

        def __reduce__(self):
            Counting.shipped += 1
            return RayActorTool, (self.handle, self.method)

    pool = SandboxPool(num_actors=1, num_cpus_per_actor=0.25, step_timeout_s=10)
    tools = {"web_search": Counting(retriever, "search")}

    async def use(n: int) -> list[str]:
        hs = await asyncio.gather(*(pool.create(tools=dict(tools)) for _ in range(n)))  # new dicts, same tool
        outs = [(await h.arun("web_search('Oslo').splitlines()[1]")).value for h in hs]
        await asyncio.gather(*(h.aclose() for h in hs))
        return outs

    try:
        assert asyncio.run(use(3)) == ["'About Oslo'"] * 3  # 3 creates at once share one registration
        shipped = Counting.shipped
        assert shipped == 1
        assert asyncio.run(use(4)) == ["'About Oslo'"] * 4
        assert Counting.shipped == shipped  # later creates name the registered tools by key
        assert ray.get(pool.actors[0].stats.remote())["toolsets"] == 1
        ray.kill(pool.actors[0], no_restart=False)  # the actor restarts empty
        for _ in range(150):  # calls fail while it restarts (ActorUnavailableError), as any Ray caller sees
            try:
                if ray.get(pool.actors[0].stats.remote(), timeout=10)["toolsets"] == 0:
                    break
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                pass
            time.sleep(0.2)
        assert asyncio.run(use(2)) == ["'About Oslo'"] * 2  # UnknownToolsError -> registered again
        assert Counting.shipped == shipped + 1
    finally:
        pool.shutdown()


def test_acall_submits_off_the_loop_keeps_errors_and_survives_cancellation(pool):
    """Handles submit Ray calls on a helper thread (the caller's loop also runs vLLM's output handler): results,
    the remote exception's own type, and a caller cancelled while its call is in flight."""
    import threading

    from raydistill.actors.sandbox_pool import acall
    from raydistill.sandbox import SandboxError

    actor = pool.actors[0]
    threads: list[int] = []

    class Spy:  # records the thread that submits
        def __init__(self, method):
            self.method = method

        def remote(self, *args):
            threads.append(threading.get_ident())
            return self.method.remote(*args)

    async def main():
        h = await pool.create()
        assert (await acall(Spy(h.actor.run), h.sid, "6 * 7")).value == "42"
        with pytest.raises(SandboxError, match="not on this actor"):
            await acall(Spy(actor.run), "no-such-sandbox", "1")
        slow = asyncio.ensure_future(acall(Spy(h.actor.run), h.sid, "import time\ntime.sleep(1)\n'late'"))
        await asyncio.sleep(0.3)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert (await h.arun("'after'")).value == "'after'"  # queued behind the slow step on this sandbox
        await asyncio.sleep(0.2)
        await h.aclose()
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert len(threads) == 3 and loop_thread not in threads
