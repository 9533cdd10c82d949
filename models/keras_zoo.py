"""Keras architecture builders (NHWC), exported through tf2onnx (needs the `tf` extra)."""
from __future__ import annotations


def keras_cnn_bn(image_size: int = 28, in_channels: int = 1, num_classes: int = 10, seed: int = 0):
    """A Keras CNN with BatchNormalization, NHWC layout, functional API."""
    import keras  # noqa: PLC0415

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, in_channels))
    x = inputs
    for filters in (16, 32):
        x = keras.layers.Conv2D(filters, 3, padding="same")(x)
        x = keras.layers.BatchNormalization(momentum=0.9)(x)  # 0.99 lags behind short CPU trainings
        x = keras.layers.ReLU()(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name="keras_cnn_bn")


def keras_separable(image_size: int = 28, in_channels: int = 1, num_classes: int = 10, seed: int = 0):
    """A Keras depthwise-separable CNN (DepthwiseConv2D, Dropout, Flatten, swish Dense)."""
    import keras  # noqa: PLC0415

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, in_channels))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="valid", activation="relu")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(16, 1, activation="relu")(x)
    x = keras.layers.AveragePooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dropout(0.2)(x)
    x = keras.layers.Dense(32, activation="swish")(x)
    outputs = keras.layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name="keras_separable")


def keras_gru(image_size: int = 28, in_channels: int = 1, num_classes: int = 10, seed: int = 0):
    """A Keras GRU reading the image row by row (channels side by side), then a ReLU dense layer: tf2onnx
    writes the GRU as a Loop over the rows."""
    import keras  # noqa: PLC0415

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, in_channels))
    x = keras.layers.Reshape((image_size, image_size * in_channels))(inputs)
    x = keras.layers.GRU(64)(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    outputs = keras.layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name="keras_gru")


KERAS_ARCHITECTURES = {"keras_cnn_bn": keras_cnn_bn, "keras_separable": keras_separable, "keras_gru": keras_gru}
