"""One exception tree for fedmq.

Every error fedmq raises on purpose derives from :class:`FedmqError`; third-party errors
(pika, SQLAlchemy, cryptography, msgpack) are translated at the boundary and never leak upward.

    FedmqError
    ├── ConfigError                  settings missing or invalid
    ├── DecodeError                  malformed bytes from the outside (codec, messages, envelopes)
    │   └── EnvelopeFormatError      (also a SignatureError) an envelope that does not parse
    ├── ModelError                   a model that cannot be built, loaded or combined
    │   ├── IncompatibleModelError   dafne-dl's name: deltas between different models, wrong shapes
    │   ├── ModelCodeError           a model function whose source does not compile or define a function
    │   ├── BlobError                a dafne blob that cannot be read
    │   └── UnsupportedModelTypeError  a blob whose ``type`` fedmq does not run (e.g. torch)
    ├── SignatureError               a model envelope that must not be trusted
    │   ├── MissingSignatureError
    │   ├── UnknownKeyError          signed with a key we do not trust (key id mismatch)
    │   ├── BadSignatureError        the signature does not verify over the header
    │   ├── PayloadMismatchError     the payload's sha256 differs from the signed header
    │   ├── ExpiredEnvelopeError
    │   ├── StaleVersionError        an older version than one already accepted (replay)
    │   └── UnexpectedEnvelopeError  a valid envelope of another kind or model
    ├── KeyFileError                 a key file that cannot be read, written or parsed
    ├── StorageError                 the database
    │   ├── DatabaseUnavailableError, DatabaseLockedError, SchemaOutOfDateError
    │   └── ImmutableRecordError     an attempt to change a stored version or blob
    ├── NotFoundError                a model, version, round, job or worker that does not exist
    ├── AlreadyExistsError           a name that is taken
    ├── RequestError                 a command's input that cannot be used (unreadable file, ...)
    ├── EncodeError                  weights the codec cannot encode (dtype not allowed, ...)
    ├── PoisonMessageError           a message that can never be processed: dead-letter it
    └── BrokerError                  RabbitMQ
        ├── BrokerUnreachableError, BrokerAccessRefusedError, BrokerChannelClosedError
        ├── UnroutableMessageError   a mandatory message no queue takes
        ├── MessageNackedError, DevBrokerError
        (TransferError, a DecodeError: a chunked transfer that cannot be reassembled)
"""

from __future__ import annotations


class FedmqError(Exception):
    """Base of every error fedmq raises on purpose."""


class ConfigError(FedmqError):
    """Settings are missing or invalid."""


class DecodeError(FedmqError, ValueError):
    """Bytes from outside the process are malformed, too large, or of a forbidden kind."""


class ModelError(FedmqError):
    """A model cannot be built, loaded or combined."""


class IncompatibleModelError(ModelError):
    """Two models cannot be combined (different model ids, array counts or shapes).

    Named as in dafne-dl, whose model code raises it from ``dafne_dl.interfaces``.
    """


class WrongDimensionalityError(ModelError):
    """Data of the wrong dimensionality for a model (dafne-dl's name)."""


class ModelCodeError(ModelError):
    """A model function's source does not compile or does not define a function."""

    def __init__(self, function_name: str, reason: str) -> None:
        super().__init__(f"model function {function_name!r}: {reason}")
        self.function_name = function_name
        self.reason = reason


class BlobError(ModelError, DecodeError):
    """A serialized model (dafne blob) cannot be read."""


class UnsupportedModelTypeError(ModelError):
    """A serialized model of a type fedmq does not run."""

    def __init__(self, model_type: str) -> None:
        super().__init__(
            f"unsupported model type {model_type!r}: fedmq runs DynamicDLModel (Keras or numpy) models"
        )
        self.model_type = model_type


class SignatureError(FedmqError):
    """A signed envelope that must not be trusted; nothing in it was unpickled."""


class EnvelopeFormatError(SignatureError, DecodeError):
    """The envelope bytes do not parse as an envelope."""


class MissingSignatureError(SignatureError):
    """The envelope carries no signature."""


class UnknownKeyError(SignatureError):
    """The envelope was signed with a key that is not the trusted one."""


class BadSignatureError(SignatureError):
    """The signature does not verify over the header."""


class PayloadMismatchError(SignatureError):
    """The payload does not match the sha256 or size in the signed header."""


class ExpiredEnvelopeError(SignatureError):
    """The envelope's validity period is over."""


class StaleVersionError(SignatureError):
    """The envelope carries an older version than one already accepted (a replay)."""


class KeyFileError(FedmqError):
    """A key file cannot be read, written or parsed."""


class StorageError(FedmqError):
    """The database is unreachable, locked, or its schema is out of date."""


class NotFoundError(FedmqError):
    """A model, version, round, job or worker does not exist."""


class BrokerError(FedmqError):
    """RabbitMQ is unreachable, refused an operation, or closed the channel."""


class UnexpectedEnvelopeError(SignatureError):
    """A genuine envelope, but not the one asked for: another kind or another model id."""


class BrokerUnreachableError(BrokerError):
    """No connection to RabbitMQ could be opened, or an open one was lost."""


class BrokerAccessRefusedError(BrokerError):
    """RabbitMQ refused the credentials, the vhost, or an operation the user may not do."""


class BrokerChannelClosedError(BrokerError):
    """RabbitMQ closed the channel or connection on purpose (precondition failed, not found, ...).

    ``reply_code`` and ``reply_text`` are the broker's own words (e.g. 406, ``PRECONDITION_FAILED``).
    """

    def __init__(self, message: str, reply_code: int = 0, reply_text: str = "") -> None:
        super().__init__(message)
        self.reply_code = reply_code
        self.reply_text = reply_text


class UnroutableMessageError(BrokerError):
    """A ``mandatory`` publish matched no queue: the broker returned it instead of dropping it."""


class MessageNackedError(BrokerError):
    """The broker refused to take responsibility for a published message (a negative confirm)."""


class DevBrokerError(BrokerError):
    """The private development RabbitMQ node cannot be started, reached or stopped."""


class TransferError(DecodeError):
    """A chunked transfer is inconsistent: wrong size, wrong sha256, conflicting metadata."""


class PoisonMessageError(FedmqError):
    """Raised by a message handler for a message that can never succeed: dead-letter it, no retry."""


class DatabaseUnavailableError(StorageError):
    """The database server cannot be reached or refused the connection."""


class DatabaseLockedError(StorageError):
    """Another process holds the database's write lock longer than the busy timeout."""


class SchemaOutOfDateError(StorageError):
    """The database schema is not at the revision this code expects (run ``fedmq db upgrade``)."""


class ImmutableRecordError(StorageError):
    """An attempt to change a record that is written once (a model version, its weights)."""


class AlreadyExistsError(FedmqError):
    """A model (or other named record) with that name already exists."""


class EncodeError(FedmqError, ValueError):
    """Weights that cannot be encoded: not an array, a dtype outside the allow-list, over the limits."""


class RequestError(FedmqError):
    """A request fedmq refuses as asked: a bad name, a missing confirmation, a no-op rollback."""
