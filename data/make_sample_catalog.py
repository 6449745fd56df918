"""Deterministic generator for the PrivAds sample ad catalog.

Running ``python data/make_sample_catalog.py`` (re)writes
``data/sample_ads.jsonl`` next to this script. The output is byte-identical
on every run because all randomness comes from a single seeded
``random.Random`` instance and only the standard library is used.

Each line of the output is a JSON object with the keys, in order:
``ad_id``, ``text``, ``bid``, ``category``, ``active``, ``ts``.

The ad texts are composed from small per-category vocabularies (product
nouns, attributes, features, audiences, qualifiers and offers) so that ads
in the same category are semantically close while different categories are
clearly distinct. All texts are synthetic: no brand names, no URLs and no
personal data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

#: Fixed Unix timestamp (2026-01-01T00:00:00Z) the ``ts`` field starts from.
BASE_TS: float = 1767225600.0

#: Default output path (next to this script).
OUTPUT_PATH: Path = Path(__file__).resolve().parent / "sample_ads.jsonl"

#: Share of ads that are marked inactive.
INACTIVE_RATE: float = 0.02

#: Shared qualifiers and offers, mixed in sparingly so categories stay distinct.
COMMON_QUALIFIERS: list[str] = [
    "premium", "budget", "eco-friendly", "handmade", "best-selling",
    "top-rated", "limited edition", "sustainable", "bestseller",
]
COMMON_OFFERS: list[str] = [
    "free shipping this week", "20% off today only", "order now",
    "shop the sale", "limited stock", "new arrivals just in",
]

#: Category name -> vocabulary. ``bid`` is the (low, high) cost-per-click
#: range in USD; ``weight`` controls the (uneven) category size.
CATEGORIES: dict[str, dict[str, Any]] = {
    "outdoor gear": {
        "bid": (0.60, 2.20),
        "weight": 1.8,
        "nouns": [
            "hiking boots", "trekking poles", "camping tent", "sleeping bag",
            "hiking backpack", "headlamp", "rain jacket", "camping stove",
            "trail daypack", "insulated hiking jacket", "camping hammock",
        ],
        "attributes": [
            "waterproof", "lightweight", "ultralight", "windproof",
            "all-weather", "packable", "rugged", "breathable", "4-season",
        ],
        "features": [
            "built for mountain trails", "made for backcountry camping",
            "tested on alpine hikes", "ready for multi-day treks",
            "with storm-proof seams", "for wilderness camping trips",
        ],
        "audiences": [
            "for hikers", "for kids", "for backpackers", "for campers",
            "for mountaineers", "for weekend hikers",
        ],
        "qualifiers": ["premium", "budget", "sustainable", "trail-tested"],
        "offers": [
            "gear up for hiking season", "free shipping on camping gear",
            "hit the trail this weekend",
        ],
    },
    "kids clothing": {
        "bid": (0.40, 1.50),
        "weight": 1.0,
        "nouns": [
            "toddler pajamas", "kids hoodie", "baby onesie", "children's jeans",
            "kids raincoat", "girls' dress", "boys' t-shirt", "toddler leggings",
            "kids school uniform", "baby bodysuit set",
        ],
        "attributes": [
            "soft cotton", "organic cotton", "stretchy", "easy-wash",
            "colourful", "cosy fleece", "tag-free", "adjustable-waist",
        ],
        "features": [
            "sized for growing kids", "gentle on sensitive baby skin",
            "ready for the playground", "perfect for back to school",
            "with fun animal prints", "made for little explorers",
        ],
        "audiences": [
            "for toddlers", "for babies", "for kids aged 3-10", "for boys",
            "for girls", "for little ones",
        ],
        "qualifiers": ["budget", "organic", "durable", "hand-me-down tough"],
        "offers": [
            "back-to-school sale on kids clothes", "buy 2 get 1 free on kidswear",
            "new children's collection",
        ],
    },
    "running shoes": {
        "bid": (0.70, 2.40),
        "weight": 1.6,
        "nouns": [
            "running shoes", "trail running shoes", "marathon racing flats",
            "road running sneakers", "cushioned running trainers",
            "carbon-plate racing shoes", "stability running shoes",
        ],
        "attributes": [
            "cushioned", "responsive", "lightweight", "breathable mesh",
            "grippy", "neutral", "wide-fit", "carbon-plated",
        ],
        "features": [
            "with responsive foam midsole", "for faster 5K and 10K times",
            "built for long marathon training runs", "with extra heel cushioning",
            "engineered for daily running miles", "with grippy trail outsole",
        ],
        "audiences": [
            "for runners", "for marathon runners", "for beginners",
            "for trail runners", "for women runners", "for men runners",
        ],
        "qualifiers": ["premium", "budget", "race-ready", "top-rated"],
        "offers": [
            "find your perfect running shoe", "run further in comfort",
            "free returns on running shoes",
        ],
    },
    "home fitness": {
        "bid": (0.60, 2.50),
        "weight": 1.2,
        "nouns": [
            "adjustable dumbbells", "yoga mat", "resistance bands",
            "kettlebell set", "foldable treadmill", "exercise bike",
            "pull-up bar", "home gym bench", "rowing machine",
        ],
        "attributes": [
            "compact", "adjustable", "non-slip", "heavy-duty", "foldable",
            "quiet", "space-saving",
        ],
        "features": [
            "for full-body home workouts", "for strength training at home",
            "fits in any living room gym", "for daily cardio workouts",
            "with guided workout app", "to build muscle without a gym",
        ],
        "audiences": [
            "for beginners", "for seniors", "for busy parents",
            "for athletes", "for small apartments",
        ],
        "qualifiers": ["premium", "budget", "pro-grade", "best-selling"],
        "offers": [
            "start your home workout today", "skip the gym membership",
            "fitness sale: save 25%",
        ],
    },
    "coffee & tea": {
        "bid": (0.10, 0.80),
        "weight": 1.0,
        "nouns": [
            "coffee beans", "espresso roast", "loose leaf green tea",
            "matcha powder", "cold brew coffee", "herbal tea blend",
            "ground coffee", "chai tea", "decaf coffee", "earl grey tea",
        ],
        "attributes": [
            "single-origin", "freshly roasted", "organic", "fair-trade",
            "dark roast", "medium roast", "caffeine-free", "aromatic",
        ],
        "features": [
            "with rich chocolate notes", "brewed for your morning cup",
            "perfect for espresso and pour-over", "steeped for a calm afternoon",
            "roasted in small batches", "with smooth low-acid flavour",
        ],
        "audiences": [
            "for coffee lovers", "for tea drinkers", "for home baristas",
            "for early risers",
        ],
        "qualifiers": ["premium", "fair-trade", "small-batch", "artisan"],
        "offers": [
            "subscribe and save on coffee", "free tasting sampler",
            "brew better mornings",
        ],
    },
    "pet supplies": {
        "bid": (0.25, 1.30),
        "weight": 1.3,
        "nouns": [
            "dog food", "cat litter", "dog leash", "cat scratching post",
            "dog bed", "puppy chew toys", "cat treats", "pet carrier",
            "aquarium filter", "dog harness",
        ],
        "attributes": [
            "grain-free", "chew-proof", "odour-control", "orthopedic",
            "natural", "washable", "vet-recommended",
        ],
        "features": [
            "your dog will love", "to keep your cat happy",
            "for healthy pets", "made for playful puppies and kittens",
            "approved by veterinarians", "for happy tails and purrs",
        ],
        "audiences": [
            "for dogs", "for cats", "for puppies", "for senior dogs",
            "for kittens", "for large breeds",
        ],
        "qualifiers": ["premium", "budget", "natural", "eco-friendly"],
        "offers": [
            "spoil your pet today", "autoship and save on pet food",
            "treat your furry friend",
        ],
    },
    "travel deals": {
        "bid": (1.00, 3.50),
        "weight": 1.5,
        "nouns": [
            "beach holiday package", "city break", "all-inclusive resort stay",
            "last-minute flights", "weekend getaway", "cruise vacation",
            "ski trip package", "island hotel deal", "European rail pass",
        ],
        "attributes": [
            "all-inclusive", "last-minute", "discounted", "luxury",
            "family-friendly", "flexible-date", "sun-soaked",
        ],
        "features": [
            "flights and hotel included", "with free cancellation",
            "book your dream vacation", "explore new destinations abroad",
            "with breakfast and airport transfer", "to sunny beaches and cities",
        ],
        "audiences": [
            "for families", "for couples", "for solo travellers",
            "for seniors", "for students", "for honeymooners",
        ],
        "qualifiers": ["luxury", "budget", "exclusive", "best-value"],
        "offers": [
            "book now, travel later", "save up to 40% on holidays",
            "early-bird travel deals",
        ],
    },
    "personal finance": {
        "bid": (2.50, 6.00),
        "weight": 0.6,
        "nouns": [
            "budgeting app", "high-yield savings account", "retirement plan",
            "low-interest personal loan", "credit card with cashback",
            "investment account", "debt consolidation loan", "credit score tool",
        ],
        "attributes": [
            "no-fee", "low-interest", "high-yield", "commission-free",
            "secure", "automated",
        ],
        "features": [
            "grow your savings with a competitive interest rate",
            "take control of your money and budget",
            "pay off debt faster", "plan for a secure retirement",
            "track spending and build credit", "start investing with small amounts",
        ],
        "audiences": [
            "for first-time investors", "for students", "for families",
            "for retirees", "for freelancers", "for young professionals",
        ],
        "qualifiers": ["no hidden fees", "trusted", "award-winning", "simple"],
        "offers": [
            "apply online in minutes", "open an account today",
            "check your rate without affecting your credit",
        ],
    },
    "insurance": {
        "bid": (3.00, 6.00),
        "weight": 0.5,
        "nouns": [
            "car insurance", "home insurance", "life insurance",
            "travel insurance", "pet insurance", "health insurance plan",
            "renters insurance", "dental insurance",
        ],
        "attributes": [
            "affordable", "comprehensive", "low-premium", "flexible",
            "full-coverage", "no-claims-bonus",
        ],
        "features": [
            "compare insurance quotes in minutes", "coverage you can count on",
            "protect what matters most", "with 24/7 claims support",
            "switch insurer and save on your premium", "get an insurance quote online",
        ],
        "audiences": [
            "for new drivers", "for homeowners", "for families",
            "for seniors", "for renters", "for self-employed",
        ],
        "qualifiers": ["cheap", "trusted", "award-winning", "fully covered"],
        "offers": [
            "get a free quote today", "save up to 30% on your policy",
            "bundle policies and save",
        ],
    },
    "gaming": {
        "bid": (0.40, 1.80),
        "weight": 1.5,
        "nouns": [
            "gaming headset", "mechanical gaming keyboard", "gaming mouse",
            "game controller", "gaming chair", "open-world video game",
            "multiplayer shooter game", "gaming monitor", "handheld game console",
        ],
        "attributes": [
            "RGB", "low-latency", "esports-grade", "high-refresh",
            "wireless", "immersive", "ergonomic",
        ],
        "features": [
            "level up your gameplay", "for competitive online multiplayer",
            "with surround sound for gaming", "built for long gaming sessions",
            "for epic boss battles and co-op raids", "with zero input lag",
        ],
        "audiences": [
            "for gamers", "for esports players", "for streamers",
            "for PC gamers", "for console players", "for casual gamers",
        ],
        "qualifiers": ["pro", "budget", "limited edition", "top-rated"],
        "offers": [
            "pre-order now", "play the new season today",
            "game on with bundle deals",
        ],
    },
    "consumer electronics": {
        "bid": (0.80, 2.80),
        "weight": 2.2,
        "nouns": [
            "wireless earbuds", "bluetooth speaker", "smartwatch",
            "4K smart TV", "noise-cancelling headphones", "tablet",
            "portable power bank", "smartphone charger", "laptop",
        ],
        "attributes": [
            "noise-cancelling", "wireless", "fast-charging", "ultra-slim",
            "high-resolution", "smart", "long-battery",
        ],
        "features": [
            "with 30h battery", "with crystal-clear sound",
            "with USB-C fast charging", "with a vivid OLED display",
            "with bluetooth 5.3 connectivity", "with all-day battery life",
        ],
        "audiences": [
            "for commuters", "for students", "for remote workers",
            "for music lovers", "for travellers",
        ],
        "qualifiers": ["premium", "budget", "latest model", "refurbished"],
        "offers": [
            "free shipping this week", "tech deals up to 35% off",
            "upgrade your gadgets today",
        ],
    },
    "skincare": {
        "bid": (0.60, 2.20),
        "weight": 1.4,
        "nouns": [
            "face moisturizer", "vitamin C serum", "sunscreen SPF 50",
            "gentle face cleanser", "retinol night cream", "hydrating face mask",
            "eye cream", "lip balm", "exfoliating toner",
        ],
        "attributes": [
            "hydrating", "fragrance-free", "dermatologist-tested", "vegan",
            "anti-aging", "non-comedogenic", "brightening",
        ],
        "features": [
            "for glowing, radiant skin", "reduces fine lines and wrinkles",
            "soothes dry and irritated skin", "with hyaluronic acid",
            "protects skin from UV damage", "for a clear complexion",
        ],
        "audiences": [
            "for sensitive skin", "for dry skin", "for oily skin",
            "for mature skin", "for men", "for teens with acne",
        ],
        "qualifiers": ["clean beauty", "cruelty-free", "premium", "gentle"],
        "offers": [
            "your new skincare routine", "free sample with every order",
            "glow-up sale on skincare",
        ],
    },
    "cookware": {
        "bid": (0.40, 1.60),
        "weight": 0.9,
        "nouns": [
            "non-stick frying pan", "cast iron skillet", "stainless steel pot set",
            "chef's knife", "dutch oven", "wok", "saucepan", "baking sheet set",
            "cookware set",
        ],
        "attributes": [
            "non-stick", "induction-ready", "oven-safe", "dishwasher-safe",
            "pre-seasoned", "tri-ply stainless",
        ],
        "features": [
            "for perfect searing and sauteing", "cooks evenly on every stove",
            "for everyday home cooking", "to upgrade your kitchen",
            "for slow-cooked stews and roasts", "sharp enough for any recipe",
        ],
        "audiences": [
            "for home cooks", "for beginner cooks", "for chefs",
            "for small kitchens", "for family dinners",
        ],
        "qualifiers": ["professional", "budget", "lifetime-warranty", "premium"],
        "offers": [
            "cook like a chef at home", "kitchen sale this week",
            "upgrade your pots and pans",
        ],
    },
    "gardening": {
        "bid": (0.15, 1.10),
        "weight": 0.7,
        "nouns": [
            "vegetable seeds", "raised garden bed", "garden hose",
            "pruning shears", "potting soil", "tomato plant starter kit",
            "compost bin", "flower bulbs", "garden gloves",
        ],
        "attributes": [
            "organic", "heirloom", "weather-resistant", "peat-free",
            "heavy-duty", "self-watering",
        ],
        "features": [
            "grow your own vegetables and herbs", "for a blooming flower garden",
            "for healthy plants and lush lawns", "ready for spring planting",
            "to harvest fresh tomatoes from your backyard", "for balcony gardens",
        ],
        "audiences": [
            "for gardeners", "for beginner gardeners", "for kids",
            "for seniors", "for balcony growers",
        ],
        "qualifiers": ["eco-friendly", "budget", "organic", "sustainable"],
        "offers": [
            "get your garden ready for spring", "plant today, harvest all summer",
            "garden centre sale",
        ],
    },
    "books & e-learning": {
        "bid": (0.30, 1.80),
        "weight": 1.0,
        "nouns": [
            "online coding course", "language learning app",
            "bestselling mystery novel", "e-book bundle", "audiobook subscription",
            "data science course", "online photography class",
            "children's picture book",
        ],
        "attributes": [
            "self-paced", "interactive", "award-winning", "beginner-friendly",
            "certified", "page-turning",
        ],
        "features": [
            "learn new skills online at your own pace",
            "with video lessons and quizzes", "earn a certificate of completion",
            "read or listen anywhere", "taught by expert instructors",
            "for lifelong learning",
        ],
        "audiences": [
            "for students", "for book lovers", "for career changers",
            "for kids", "for beginners", "for seniors",
        ],
        "qualifiers": ["bestselling", "budget", "highly rated", "free trial"],
        "offers": [
            "start learning today", "first month free",
            "enroll now and save 50%",
        ],
    },
    "car accessories": {
        "bid": (0.40, 1.70),
        "weight": 0.8,
        "nouns": [
            "car phone mount", "dash cam", "all-weather car floor mats",
            "car seat covers", "tire inflator", "car vacuum cleaner",
            "roof cargo box", "jump starter", "car organizer",
        ],
        "attributes": [
            "universal-fit", "heavy-duty", "portable", "12V",
            "easy-install", "weatherproof",
        ],
        "features": [
            "for safer driving", "keeps your car interior clean",
            "for road trips and daily commutes", "fits most cars, SUVs and trucks",
            "for roadside emergencies", "records every drive in HD",
        ],
        "audiences": [
            "for drivers", "for new drivers", "for SUV owners",
            "for road-trippers", "for truck owners",
        ],
        "qualifiers": ["premium", "budget", "best-selling", "rugged"],
        "offers": [
            "upgrade your ride", "auto accessories sale",
            "free shipping on car gear",
        ],
    },
    "furniture": {
        "bid": (0.80, 2.60),
        "weight": 1.1,
        "nouns": [
            "sofa", "dining table", "bookshelf", "office chair", "bed frame",
            "coffee table", "wardrobe", "sectional couch", "TV stand",
        ],
        "attributes": [
            "solid wood", "mid-century modern", "upholstered", "minimalist",
            "space-saving", "easy-assembly", "scandinavian-style",
        ],
        "features": [
            "for a cosy living room", "to furnish your new home",
            "for a stylish bedroom makeover", "fits small apartments",
            "with white-glove delivery", "built to last for years",
        ],
        "audiences": [
            "for living rooms", "for home offices", "for families",
            "for small spaces", "for students",
        ],
        "qualifiers": ["premium", "budget", "handmade", "sustainable"],
        "offers": [
            "furniture sale up to 40% off", "free delivery and assembly",
            "refresh your home today",
        ],
    },
    "jewellery": {
        "bid": (0.70, 2.50),
        "weight": 0.6,
        "nouns": [
            "gold necklace", "silver earrings", "diamond engagement ring",
            "charm bracelet", "pearl earrings", "gemstone pendant",
            "wedding band", "stacking rings",
        ],
        "attributes": [
            "sterling silver", "18k gold", "hypoallergenic", "dainty",
            "personalised", "sparkling",
        ],
        "features": [
            "a timeless gift for someone special", "for anniversaries and birthdays",
            "crafted with conflict-free diamonds", "adds sparkle to any outfit",
            "elegant jewellery for every occasion", "comes in a luxury gift box",
        ],
        "audiences": [
            "for her", "for him", "for brides", "for mothers",
            "for anniversaries",
        ],
        "qualifiers": ["handmade", "luxury", "fine", "affordable"],
        "offers": [
            "the perfect gift", "free engraving this week",
            "jewellery sale: 25% off",
        ],
    },
    "music instruments": {
        "bid": (0.50, 1.90),
        "weight": 0.4,
        "nouns": [
            "acoustic guitar", "digital piano", "electric guitar",
            "drum kit", "ukulele", "violin", "MIDI keyboard", "bass guitar",
            "guitar amplifier",
        ],
        "attributes": [
            "beginner", "weighted-key", "solid-top", "full-size",
            "compact", "studio-quality",
        ],
        "features": [
            "learn to play music at home", "with rich, warm tone",
            "includes lessons and tuner", "for practice and live gigs",
            "for songwriting and recording", "perfect for your first band",
        ],
        "audiences": [
            "for beginners", "for kids", "for musicians",
            "for music students", "for adults learning to play",
        ],
        "qualifiers": ["professional", "budget", "handcrafted", "premium"],
        "offers": [
            "start playing music today", "free online music lessons included",
            "instrument sale this week",
        ],
    },
    "sustainable fashion": {
        "bid": (0.50, 1.90),
        "weight": 0.9,
        "nouns": [
            "organic cotton t-shirt", "recycled denim jeans", "linen shirt",
            "hemp tote bag", "recycled wool sweater", "upcycled jacket",
            "bamboo socks", "vegan leather sneakers",
        ],
        "attributes": [
            "ethically made", "recycled", "organic", "plastic-free",
            "fair-wage", "slow-fashion", "low-impact",
        ],
        "features": [
            "made from recycled materials", "good for the planet",
            "ethically produced clothing", "with carbon-neutral shipping",
            "for a conscious wardrobe", "made to last, not to waste",
        ],
        "audiences": [
            "for women", "for men", "for conscious shoppers",
            "for everyday wear", "for eco-minded shoppers",
        ],
        "qualifiers": ["sustainable", "eco-friendly", "handmade", "ethical"],
        "offers": [
            "shop sustainable style", "wear the change",
            "free carbon-neutral delivery",
        ],
    },
}

#: Minimum number of ads per category.
MIN_PER_CATEGORY: int = 25


def _category_sizes(n: int, rng: random.Random) -> dict[str, int]:
    """Split ``n`` ads unevenly across categories (each >= MIN_PER_CATEGORY)."""
    names = list(CATEGORIES)
    if n < MIN_PER_CATEGORY * len(names):
        raise ValueError(f"n must be >= {MIN_PER_CATEGORY * len(names)}")
    weights = [CATEGORIES[c]["weight"] * rng.uniform(0.8, 1.2) for c in names]
    spare = n - MIN_PER_CATEGORY * len(names)
    total = sum(weights)
    sizes = {c: MIN_PER_CATEGORY + int(spare * w / total) for c, w in zip(names, weights, strict=True)}
    # Hand out the rounding remainder to the heaviest categories.
    order = sorted(names, key=lambda c: -CATEGORIES[c]["weight"])
    i = 0
    while sum(sizes.values()) < n:
        sizes[order[i % len(order)]] += 1
        i += 1
    return sizes


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _compose(vocab: dict[str, Any], rng: random.Random) -> str:
    """Compose one ad text from a category vocabulary."""
    noun = rng.choice(vocab["nouns"])
    attr = rng.choice(vocab["attributes"])
    attr2 = rng.choice([a for a in vocab["attributes"] if a != attr])
    feat = rng.choice(vocab["features"])
    aud = rng.choice(vocab["audiences"])
    qual = rng.choice(vocab["qualifiers"] + COMMON_QUALIFIERS[:3])
    offer = rng.choice(vocab["offers"] + COMMON_OFFERS[:2])
    template = rng.randrange(8)
    if template == 0:
        return f"{attr} {noun} {aud}, {qual}, {rng.choice(COMMON_QUALIFIERS)}"
    if template == 1:
        return f"{_cap(attr)} {noun} {feat} — {offer}"
    if template == 2:
        return f"{_cap(qual)} {attr} {noun} {aud}: {feat}. {_cap(offer)}!"
    if template == 3:
        return f"{_cap(noun)} {aud}, {attr} and {attr2} — {offer}"
    if template == 4:
        return f"{_cap(attr)}, {attr2} {noun} {feat}, {qual}"
    if template == 5:
        return f"New: {qual} {noun} {aud}. {_cap(feat)}. {_cap(offer)}."
    if template == 6:
        return f"{_cap(attr)} {noun} {feat}"
    return f"{_cap(offer)}: {attr} {noun} {aud}, {feat}"


def generate(n: int = 1000, seed: int = 7) -> list[dict]:
    """Generate a deterministic synthetic ad catalog.

    Parameters
    ----------
    n : int, default 1000
        Number of ads to generate. Must be at least
        ``MIN_PER_CATEGORY * len(CATEGORIES)``.
    seed : int, default 7
        Seed for the ``random.Random`` instance; the same ``(n, seed)``
        always yields the same catalog.

    Returns
    -------
    list of dict
        Ads in ``ad_id`` order, each a dict with keys (in this order)
        ``ad_id`` (str, ``"ad-0001"`` ...), ``text`` (str, unique, 20-300
        chars), ``bid`` (float, USD cost per click rounded to 2 decimals),
        ``category`` (str, a key of :data:`CATEGORIES`), ``active`` (bool)
        and ``ts`` (float Unix seconds starting at :data:`BASE_TS`).

    Raises
    ------
    ValueError
        If ``n`` is too small to give every category its minimum size.
    RuntimeError
        If the vocabularies cannot produce enough unique texts.
    """
    rng = random.Random(seed)
    sizes = _category_sizes(n, rng)

    seen: set[str] = set()
    pool: list[tuple[str, str]] = []
    for cat, size in sizes.items():
        vocab = CATEGORIES[cat]
        made, attempts = 0, 0
        while made < size:
            attempts += 1
            if attempts > 200 * size:
                raise RuntimeError(f"not enough unique texts for {cat!r}")
            text = _compose(vocab, rng)
            if text in seen or not 20 <= len(text) <= 300:
                continue
            seen.add(text)
            pool.append((cat, text))
            made += 1
    rng.shuffle(pool)

    ads: list[dict] = []
    ts = BASE_TS
    for i, (cat, text) in enumerate(pool, start=1):
        lo, hi = CATEGORIES[cat]["bid"]
        # Triangular skews bids towards the lower-middle of the category range.
        bid = round(rng.triangular(lo, hi, lo + (hi - lo) * 0.35), 2)
        ts += rng.randint(1, 9)
        ads.append({
            "ad_id": f"ad-{i:04d}",
            "text": text,
            "bid": bid,
            "category": cat,
            "active": rng.random() >= INACTIVE_RATE,
            "ts": float(ts),
        })

    texts = [a["text"] for a in ads]
    assert len(set(texts)) == len(texts), "duplicate ad texts"
    assert all(20 <= len(t) <= 300 for t in texts)
    assert min(sizes.values()) >= MIN_PER_CATEGORY
    return ads


def write_jsonl(ads: list[dict], path: Path = OUTPUT_PATH) -> None:
    """Write ads as JSON Lines (one object per line, ``\\n`` line endings)."""
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for ad in ads:
            fh.write(json.dumps(ad, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    catalog = generate()
    write_jsonl(catalog)
    print(f"wrote {len(catalog)} ads to {OUTPUT_PATH}")
