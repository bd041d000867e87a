"""Locate a fact: causal tracing (ROME), knowledge neurons (Dai et al.) and fast attribution.

    from ffkv.locate.trace import causal_trace
    r = causal_trace(model, "The Eiffel Tower is located in the city of", "The Eiffel Tower")
    r.scores            # (tokens, layers) restored P(answer)

    from ffkv.locate.neurons import knowledge_neurons
    kn = knowledge_neurons(model, paraphrases, "Paris")
    kn.neurons          # [Neuron(layer, index, attribution)], largest first; kn.memories: [MemoryId]

    from ffkv.locate.registry import locate
    res = locate(model, "trace-mlp", prompt, subject, "Paris")   # any locator -> LocateResult
    res.scores          # (sites, tokens, layers)

Sub-modules: trace (tracing and its ROME reference), layer_choice (the edit layer by tracing: ``trace_layer``),
average (data-set averages by token group), attribution (integrated gradients, the one implementation, with its
variants as options; gradient x activation, attribution patching), neurons (``knowledge_neurons``, the one
implementation), interventions (suppress / amplify, the one ablation curve, ``memories_off``), result and registry
(the locator contract ``LocateResult`` and ``LOCATORS``), ground_truth (checks against the testbed's known facts),
plots (``plot_locate`` draws any locator's result).
"""
