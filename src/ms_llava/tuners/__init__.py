"""PEFT tuners that ms-llava adds: ScAle (`ms_llava.tuners.scale`). Import the tuner's module to register it with
PEFT."""
