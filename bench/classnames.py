"""Class names the benchmarks share."""

# CIFAR-100's 100 class names: mixed lengths, so a text tower's width follows the longest prompt.
CIFAR100 = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()


def imagenet500() -> tuple:
    """ImageNet's first 500 class names (the base classes of its base-to-novel split), from open_clip's
    own metadata (no download): 1-12 words, 7-18 tokens as the learner's prompts, mean 8.4."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return tuple(IMAGENET_CLASSNAMES[:500])


def classnames(count: int) -> tuple:
    """``count`` names of mixed lengths: CIFAR-100's up to 100, ImageNet's beyond."""
    names = CIFAR100 if count <= len(CIFAR100) else imagenet500()
    if count > len(names):
        raise ValueError(f"only {len(names)} benchmark class names, asked for {count}")
    return names[:count]
