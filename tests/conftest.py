"""Tests run offline on tiny random models; nothing may reach a hub."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MOE_ARCHS = ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek"]
ALL_ARCHS = MOE_ARCHS + ["llama", "mistral"]
