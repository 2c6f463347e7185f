import pytest
import torch

from models.knn import bank_dtype, knn_accuracies, knn_accuracy, knn_predict, l2_normalize_


def test_separable_features_score_100_percent():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=generator) * 5
    train_labels = torch.arange(5).repeat(40)
    query_labels = torch.arange(5).repeat(10)
    train = centres[train_labels] + 0.1 * torch.randn(200, 16, generator=generator)
    query = centres[query_labels] + 0.1 * torch.randn(50, 16, generator=generator)
    assert knn_accuracy(l2_normalize_(train), train_labels, query, query_labels, num_classes=5) == 100.0


def test_votes_are_weighted_by_exp_similarity_over_t():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[3.0, 0.0]])  # queries may have any length
    scores = knn_predict(train, labels, query, num_classes=2, k=2, temperature=0.5)
    # the two nearest are sample 0 (cos 1) and sample 2 (cos 0.6)
    torch.testing.assert_close(scores, torch.tensor([[torch.e ** 2, torch.e ** 1.2]]))


def test_chunking_does_not_change_the_result():
    generator = torch.Generator().manual_seed(1)
    train = l2_normalize_(torch.randn(300, 8, generator=generator))
    query = torch.randn(77, 8, generator=generator)
    labels = torch.randint(0, 4, (300,), generator=generator)
    full = knn_predict(train, labels, query, 4, chunk=1000)
    torch.testing.assert_close(knn_predict(train, labels, query, 4, chunk=10), full, rtol=1e-4, atol=0)


def test_the_bank_is_normalised_in_place_and_an_unnormalised_bank_is_refused():
    generator = torch.Generator().manual_seed(2)
    bank = torch.randn(100, 8, generator=generator) * 3
    expected = bank / bank.norm(dim=1, keepdim=True)
    pointer = bank.data_ptr()
    bank[7] = 0  # a dead feature stays zero (and is accepted)
    expected[7] = 0
    assert l2_normalize_(bank, chunk=32) is bank and bank.data_ptr() == pointer
    torch.testing.assert_close(bank, expected)
    labels = torch.arange(100) % 3
    knn_predict(bank, labels, bank[:5], 3)
    with pytest.raises(ValueError, match="L2-normalised"):
        knn_predict(bank * 2, labels, bank[:5], 3)


def test_a_float16_bank_votes_like_a_float32_one_and_only_cuda_gets_it():
    assert bank_dtype("cpu") == torch.float32 and bank_dtype(torch.device("cuda", 0)) == torch.float16
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(10, 64, generator=generator)
    labels = torch.arange(2000) % 10
    bank = l2_normalize_(centres[labels] + 0.8 * torch.randn(2000, 64, generator=generator))
    queries = centres[torch.arange(500) % 10] + 0.8 * torch.randn(500, 64, generator=generator)
    full = knn_predict(bank, labels, queries, 10)
    half = knn_predict(bank.half(), labels, queries, 10)  # float16 matmul and top-k run on this CPU too
    assert (full.argmax(1) == half.argmax(1)).float().mean() > 0.99


def test_a_similarity_budget_smaller_than_a_chunk_does_not_change_the_result():
    generator = torch.Generator().manual_seed(4)
    bank = l2_normalize_(torch.randn(1000, 8, generator=generator))
    labels = torch.randint(0, 5, (1000,), generator=generator)
    queries = torch.randn(300, 8, generator=generator)
    full = knn_predict(bank, labels, queries, 5)
    for budget in (3000, 10):  # 3 queries at a time against 1000; one at a time
        torch.testing.assert_close(knn_predict(bank, labels, queries, 5, max_similarities=budget), full,
                                   rtol=1e-4, atol=0)


def test_knn_accuracies_score_each_k_as_its_own_vote():
    generator = torch.Generator().manual_seed(5)
    centres = torch.randn(6, 16, generator=generator)
    labels = torch.arange(300) % 6
    bank = l2_normalize_(centres[labels] + 1.5 * torch.randn(300, 16, generator=generator))
    query_labels = torch.arange(120) % 6
    queries = centres[query_labels] + 1.5 * torch.randn(120, 16, generator=generator)
    results = knn_accuracies(bank, labels, queries, query_labels, 6, ks=(1, 20, 200), temperature=0.1)
    assert list(results) == ["1", "20", "200"]  # keyed as the JSON reports write them
    for k, row in results.items():
        scores = knn_predict(bank, labels, queries, 6, k=int(k), temperature=0.1)
        top1 = (scores.argmax(1) == query_labels).float().mean().item() * 100
        assert row["top1"] == pytest.approx(top1) and 100 >= row["top5"] >= row["top1"]
    assert len({row["top1"] for row in results.values()}) > 1  # each k votes with its own neighbours
    assert knn_accuracy(bank, labels, queries, query_labels, 6, k=20, temperature=0.1) == results["20"]["top1"]
