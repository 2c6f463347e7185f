import torch

from models.knn import knn_accuracy, knn_predict


def test_separable_features_score_100_percent():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=generator) * 5
    train_labels = torch.arange(5).repeat(40)
    query_labels = torch.arange(5).repeat(10)
    train = centres[train_labels] + 0.1 * torch.randn(200, 16, generator=generator)
    query = centres[query_labels] + 0.1 * torch.randn(50, 16, generator=generator)
    assert knn_accuracy(train, train_labels, query, query_labels, num_classes=5) == 100.0


def test_votes_are_weighted_by_exp_similarity_over_t():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(train, labels, query, num_classes=2, k=2, temperature=0.5)
    # the two nearest are sample 0 (cos 1) and sample 2 (cos 0.6)
    torch.testing.assert_close(scores, torch.tensor([[torch.e ** 2, torch.e ** 1.2]]))


def test_chunking_does_not_change_the_result():
    generator = torch.Generator().manual_seed(1)
    train, query = torch.randn(300, 8, generator=generator), torch.randn(77, 8, generator=generator)
    labels = torch.randint(0, 4, (300,), generator=generator)
    full = knn_predict(train, labels, query, 4, chunk=1000)
    torch.testing.assert_close(knn_predict(train, labels, query, 4, chunk=10), full, rtol=1e-4, atol=0)
