"""A user's custom dataset module, referenced from configs as 'custom_data:get_data'."""


def get_data(options):
    for i in range(options.get("n", 3)):
        yield {"prompt": f"count {i}", "completion": str(i + 1)}
