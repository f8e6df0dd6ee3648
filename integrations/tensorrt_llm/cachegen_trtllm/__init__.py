"""TensorRT-LLM KV cache connector for libcachegen (PyTorch backend).

Enable it with the LLM API::

    from tensorrt_llm import LLM
    from tensorrt_llm.llmapi.llm_args import KvCacheConnectorConfig

    llm = LLM(model=..., backend="pytorch", cuda_graph_config=None,
              kv_connector_config=KvCacheConnectorConfig(
                  connector_module="cachegen_trtllm.connector",
                  connector_scheduler_class="CacheGenConnectorScheduler",
                  connector_worker_class="CacheGenConnectorWorker"))

and configure libcachegen through ``CACHEGEN_TRTLLM_CONFIG`` (a JSON object,
or the path of a JSON file). The connector module imports TensorRT-LLM; this
package's top level does not, so ``import cachegen_trtllm`` works without it.
"""

__version__ = "0.1.0"
CONNECTOR_MODULE = "cachegen_trtllm.connector"
SCHEDULER_CLASS = "CacheGenConnectorScheduler"
WORKER_CLASS = "CacheGenConnectorWorker"
CONFIG_ENV = "CACHEGEN_TRTLLM_CONFIG"

# The TensorRT-LLM source the connector interface was checked against.
CHECKED_TRTLLM_SOURCE = {
    "tensorrt_llm/_torch/pyexecutor/connectors/kv_cache_connector.py": "5a06f334f04fb515ff79f73b7f0f7726ad757361",
    "tensorrt_llm/_torch/pyexecutor/kv_cache_connector.py": "3277953654b9b2863dae4f1cb81856b172837db4",
}


def connector_config_kwargs() -> dict:
    """The three ``KvCacheConnectorConfig`` fields that select this connector."""
    return {
        "connector_module": CONNECTOR_MODULE,
        "connector_scheduler_class": SCHEDULER_CLASS,
        "connector_worker_class": WORKER_CLASS,
    }
