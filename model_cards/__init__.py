"""Model card templates, shipped with the package as `ms_llava.model_cards` (see `ms_llava.hub`)."""
