"""The bundled offline demo model: its data generator, training and examples."""
