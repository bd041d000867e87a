"""Locate a fact: causal tracing (ROME), knowledge neurons (Dai et al.) and fast attribution.

    from ffkv.locate.trace import causal_trace
    r = causal_trace(model, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
    r.scores            # (tokens, layers) restored P(answer)

    from ffkv.locate.neurons import knowledge_neurons
    kn = knowledge_neurons(model, paraphrases, "Paris")
    kn.neurons          # [(layer, index, attribution)]

Sub-modules: trace (tracing and its ROME reference), average (data-set averages by token group),
attribution (integrated gradients, gradient x activation, attribution patching), neurons, interventions,
ground_truth (checks against the testbed's known facts), plots.
"""
