"""Second floor: loading models and tokenizers, quantization, the memory plan, rewards,
the RL helpers shared by the policy stages, and the speed levers. Imports only ground."""
