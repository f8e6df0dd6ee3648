"""vLLM V1 KV connector for libcachegen.

Load it with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "CacheGenConnector",
        "kv_connector_module_path": "cachegen_vllm.connector", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {...}}'

The connector module imports vLLM; this package's top level does not, so
``import cachegen_vllm`` works without vLLM installed.
"""

__version__ = "0.1.0"
CONNECTOR_NAME = "CacheGenConnector"
CONNECTOR_MODULE = "cachegen_vllm.connector"
TESTED_VLLM = ("0.33.0",)
