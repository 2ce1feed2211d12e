"""The order a stage hands its attack tasks to its actors (pipeline/stages/work_order.py):
longest first, by the attack's own count of gradient steps, so a stage does not end on one
actor working through CW while the others idle."""

from pipeline.config_loader import load_config
from pipeline.stages.work_order import attack_cost, longest_first


def test_the_demo_tasks_go_slowest_attack_first_and_equal_costs_keep_their_order():
    settings = load_config("configs/digits.yaml").attacks.family_settings()
    # (attack, samples): the digits demo's test split of 360 in batches of 256, subsets of 100.
    tasks = [(None, 256), (None, 104), ("PGD_N", 256), ("PGD_N", 104), ("FGSM_N", 256), ("FGSM_N", 104),
             ("CW_N", 100), ("CW_T", 100), ("AA_N", 100), ("JSMA_T", 100)]
    ordered = longest_first(tasks, lambda t: (attack_cost(t[0], t[1], settings), t[1]))
    assert ordered == [("AA_N", 100), ("JSMA_T", 100),  # no fixed step count: taken as the longest
                       ("CW_N", 100), ("CW_T", 100),  # 500 iterations x 4 binary-search steps x 100
                       ("PGD_N", 256), ("PGD_N", 104), ("FGSM_N", 256), ("FGSM_N", 104),
                       (None, 256), (None, 104)]


def test_attack_cost_counts_the_attacks_own_steps():
    settings = load_config("configs/digits.yaml").attacks.family_settings()
    assert attack_cost("PGD_T", 10, settings) == 20 * 10
    assert attack_cost("CW_N", 10, settings) == 500 * 4 * 10
    assert attack_cost("FGSM_N", 10, settings) == 10
    assert attack_cost(None, 10, settings) == 0


def test_a_free_actor_takes_the_next_task_while_the_other_works_on_a_slow_one(ray_local):
    """``as_completed`` on two real actors: the five short tasks all finish, on the free
    actor, before the long one; Ray's ordered ActorPool.map would hold them behind it."""
    import time

    from pipeline.stages.work_order import as_completed

    @ray_local.remote(num_cpus=0)
    class Sleeper:
        def sleep(self, seconds: float) -> float:
            time.sleep(seconds)
            return seconds

    actors = [Sleeper.remote() for _ in range(2)]
    tasks = [("long", 3.0)] + [(f"short-{i}", 0.05) for i in range(5)]
    done = list(as_completed(actors, tasks, lambda actor, task: actor.sleep.remote(task[1])))
    assert [task for task, _ in done][-1] == ("long", 3.0)
    assert sorted(done) == sorted((task, task[1]) for task in tasks)  # each result with its own task
