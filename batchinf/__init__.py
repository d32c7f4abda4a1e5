"""batchinf: an asynchronous batch-inference job queue for image models on Ray.

Nothing is imported or started here: TensorFlow, Ray and boto3 load where they are used.
"""

__version__ = "0.1.0"
