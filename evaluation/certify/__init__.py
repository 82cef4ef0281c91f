"""Certified policy improvement (HCPI with mixture and SPIBB candidates): see :mod:`evaluation.certify.core`."""

from evaluation.certify.core import Certificate, Certification, CertifyConfig, certify, remission_outcome
from policies.candidates import Candidate, CandidatePolicy, FirstChoicePolicy, candidate_grid

__all__ = ["Candidate", "CandidatePolicy", "Certificate", "Certification", "CertifyConfig", "FirstChoicePolicy",
           "candidate_grid", "certify", "remission_outcome"]
