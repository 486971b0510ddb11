"""The service contract: model and tensor names, dtypes and limits.

Export, the Triton models, the configs' tests and the client all read these, so a name or a limit
is changed in one place. Dependency-free: the thin client imports it.
"""

from __future__ import annotations

from typing import Final

# Where a server started by `ecomsearch serve` (or the container) listens by default.
DEFAULT_HTTP_PORT: Final = 8000
DEFAULT_GRPC_PORT: Final = 8001
DEFAULT_METRICS_PORT: Final = 8002
DEFAULT_GRPC_URL: Final = f"localhost:{DEFAULT_GRPC_PORT}"
# The client's deadline for a request unless told otherwise; the server's queue timeout (see
# query_encoder/config.pbtxt) stays below it, so a request is shed rather than abandoned.
DEFAULT_CLIENT_TIMEOUT_S: Final = 2.0

# Model names as they appear in model_repository/.
SEARCH_MODEL: Final = "search"  # the product: ranked results
SEARCH_UNRANKED_MODEL: Final = "search_unranked"  # retrieval-stage order, for evaluation
PREPROCESS_MODEL: Final = "preprocess"
ENCODER_MODEL: Final = "query_encoder"
RETRIEVE_MODEL: Final = "retrieve"
RANKER_MODEL: Final = "ranker"
SELECT_MODEL: Final = "select"
CATALOG_MODEL: Final = "catalog"  # writes to the live catalog: upserts and deletes
# The cross-encoder that `select` calls to rerank the ranker's top candidates when asked.
CROSS_ENCODER_MODEL: Final = "cross_encoder"

# Inputs and outputs of the `search` ensemble.
QUERY: Final = "query"  # BYTES [batch, 1], UTF-8
TOP_K: Final = "top_k"  # INT32 [batch, 1], optional
PRODUCT_IDS: Final = "product_ids"  # BYTES [batch, k]
SCORES: Final = "scores"  # FP32 [batch, k], higher is better
TITLES: Final = "titles"  # BYTES [batch, k]
PRICES: Final = "prices"  # FP32 [batch, k], NaN when the product has no price
IN_STOCK: Final = "in_stock"  # BOOL [batch, k]
# Optional: why each hit ranks where it does. With `explain` true for a query, each of its
# hits' `explanations` entry is UTF-8 JSON: the score, the ranker's base value, and each
# feature's value and contribution (summing, with a personalised search's term, to the score);
# otherwise the entries are empty.
EXPLAIN: Final = "explain"  # BOOL [batch, 1], optional
EXPLANATIONS: Final = "explanations"  # BYTES [batch, k]
# Optional: rerank the ranker's best `rerank_depth` candidates with the cross-encoder (its
# term is added to their scores, and shown in explanations). Absent: select's `rerank_depth`
# parameter (0 as shipped: docs/relevance.md). 0 turns it off for the query.
RERANK_DEPTH: Final = "rerank_depth"  # INT32 [batch, 1], optional
MAX_RERANK_DEPTH: Final = 100

# Optional filters of `search` and `search_unranked`, one value per query ([batch, 1]); an
# absent input, an empty string or a NaN bound means no filter of that kind. Exact: a result
# never fails a filter, and a search returns k results whenever k products pass them.
FILTER_CATEGORY: Final = "category"  # BYTES: a prefix of the category path, "Components > SSD"
FILTER_BRAND: Final = "brand"  # BYTES: the brand, compared case-insensitively
FILTER_MIN_PRICE: Final = "min_price"  # FP32: price >= this (products without a price fail)
FILTER_MAX_PRICE: Final = "max_price"  # FP32: price <= this
FILTER_IN_STOCK: Final = "in_stock_only"  # BOOL: only products in stock
FILTER_INPUTS: Final = (
    FILTER_CATEGORY,
    FILTER_BRAND,
    FILTER_MIN_PRICE,
    FILTER_MAX_PRICE,
    FILTER_IN_STOCK,
)
# The separator of category path levels in a category filter and in search results.
CATEGORY_SEPARATOR: Final = " > "

# Inputs and outputs of the `catalog` model: one request is one write (a transaction).
PRODUCTS: Final = "products"  # BYTES [n]: one JSON object per product to upsert
DELETE_IDS: Final = "delete_ids"  # BYTES [n]: ids of products to delete
# A server started with a write key takes a write only when the request carries it in this
# request parameter (see docs/live-catalog.md): search is public, changing the catalog is not.
WRITE_KEY_PARAMETER: Final = "write_key"
SEQUENCE_NUMBER: Final = "sequence_number"  # INT64 [1]: the catalog's change number after it
CHANGED: Final = "changed"  # INT64 [1]: products written (deletes of unknown ids do not count)

# Recommendation (see docs/recommendations.md). Shoppers' events go in through `events`; the
# `recommend` and `similar` pipelines answer with the same outputs as `search`.
EVENTS_MODEL: Final = "events"  # records shoppers' events: views, carts, purchases
RECOMMEND_MODEL: Final = "recommend"  # user (and recent products) -> ranked products
SIMILAR_MODEL: Final = "similar"  # product -> products bought with it or like it
RECOMMEND_CANDIDATES_MODEL: Final = "recommend_candidates"
SIMILAR_CANDIDATES_MODEL: Final = "similar_candidates"
RECOMMEND_RANKER_MODEL: Final = "recommend_ranker"

# Inputs of the `events` model: one request is one write (a transaction) of n events.
EVENT_USER_IDS: Final = "user_ids"  # BYTES [n]
EVENT_PRODUCT_IDS: Final = "product_ids"  # BYTES [n]: products of the live catalog
EVENT_KINDS_INPUT: Final = "kinds"  # BYTES [n]: one of EVENT_KINDS
EVENT_QUANTITIES: Final = "quantities"  # INT32 [n], optional: 1 each when absent
EVENT_TIMESTAMPS: Final = "timestamps_s"  # FP64 [n], optional: seconds since the epoch (UTC);
# absent means when the server receives the write. Events older than the log's newest are kept
# (the log is in arrival order), but time-decayed statistics treat them as of their own time.
RECORDED: Final = "recorded"  # INT64 [1]: events written (the output beside SEQUENCE_NUMBER)
EVENT_KINDS: Final = ("view", "cart", "purchase")
MAX_EVENTS_PER_WRITE: Final = 1000
MAX_USER_ID_BYTES: Final = 256
MAX_EVENT_QUANTITY: Final = 1_000_000

# Inputs of `recommend` ([batch, 1] unless said) and `similar`.
USER_ID: Final = "user_id"  # BYTES: an unknown user gets the non-personal answer; also an
# optional input of `search` (personalised search) and of `select`
RECENT_PRODUCT_IDS: Final = "recent_product_ids"  # BYTES [batch, r], optional, "" pads: what
# the shopper looked at in this session and the log does not hold yet
MAX_RECENT_PRODUCTS: Final = 50
PRODUCT_ID: Final = "product_id"  # BYTES: the product `similar` starts from (INVALID_ARG if
# it is not in the live catalog)

# Tensors between the composing models.
INPUT_IDS: Final = "input_ids"  # INT64 [batch, sequence]
ATTENTION_MASK: Final = "attention_mask"  # INT64 [batch, sequence]
EMBEDDING: Final = "embedding"  # FP32 [batch, dim], L2-normalised
CANDIDATE_ROWS: Final = "candidate_rows"  # INT64 [batch, candidates], -1 pads
CANDIDATE_FEATURES: Final = "candidate_features"  # FP32 [batch, candidates, features]
RETRIEVAL_SCORES: Final = "retrieval_scores"  # FP32 [batch, candidates], fused vector + BM25
RANKING_SCORES: Final = "ranking_scores"  # FP32 [batch, candidates], the ranker's
CANDIDATE_SCORES: Final = "candidate_scores"  # FP32 [batch, candidates], what `select` sorts by
# The cross-encoder's pairs ([CLS] query [SEP] title [SEP]) and its answer.
TOKEN_TYPE_IDS: Final = "token_type_ids"  # INT64 [pairs, sequence]: 0 query, 1 product
RELEVANCE_LOGITS: Final = "relevance_logits"  # FP32 [pairs, 1]: its sigmoid is P(relevant)
# A pair is at most this many tokens, the product side truncated first: titles and the start of
# a description fit. Training, export and select's rerank tokenize alike.
CROSS_ENCODER_MAX_TOKENS: Final = 64

# Limits, documented in the README and enforced by the models.
DEFAULT_TOP_K: Final = 10
MAX_TOP_K: Final = 100
# The ensemble's max_batch_size: queries in one request. Larger batches are rejected by Triton.
MAX_QUERIES_PER_REQUEST: Final = 64
# A query is a few words; anything this long is a client bug or abuse, not a search.
MAX_QUERY_BYTES: Final = 2048
# Queries longer than this many tokens are truncated (after the byte-length check).
MAX_QUERY_TOKENS: Final = 64
# Candidates a query may carry between the inner models (retrieve makes vector + lexical pool,
# 400 by default). The inner models are reachable by any client, so each checks its inputs
# against these limits before any work: one request cannot make them work without bound.
MAX_CANDIDATES: Final = 1024
# Longest token sequence the encoder accepts from a direct caller (preprocess sends at most
# MAX_QUERY_TOKENS plus padding); BERT-class position tables end at 512.
MAX_SEQUENCE_LENGTH: Final = 512
# Product text is embedded at up to this many tokens (title first, so it survives truncation);
# `preprocess` accepts it as an optional `max_tokens` from the catalog writer.
PRODUCT_MAX_TOKENS: Final = 128
MAX_TOKENS: Final = "max_tokens"  # INT32 [batch, 1], optional input of `preprocess`
# Writes: products a request may carry, and the size of one product's JSON.
MAX_PRODUCTS_PER_WRITE: Final = 1000
MAX_PRODUCT_JSON_BYTES: Final = 32 * 1024
MAX_PRODUCT_ID_BYTES: Final = 256
MAX_TITLE_BYTES: Final = 1024
# Filter values are short names; anything longer is not a category or a brand.
MAX_FILTER_BYTES: Final = 512
