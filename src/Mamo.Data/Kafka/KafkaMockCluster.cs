using System.Reflection;
using System.Runtime.InteropServices;
using System.Text;

namespace Mamo.Data.Kafka;

/// <summary>
/// librdkafka's in-memory mock cluster: real Kafka protocol on 127.0.0.1 ports, for development and tests.
/// Not durable and not for production: its topics live in this process's memory.
/// Bound by P/Invoke into the librdkafka that Confluent.Kafka loaded (its fallback build on Debian, see
/// ENVIRONMENT.md), so both talk to one copy of the library.
/// </summary>
public sealed class KafkaMockCluster : IDisposable
{
    const string Library = "mamo-librdkafka";   // resolved to the loaded librdkafka, never searched for
    IntPtr handle, cluster;

    public string BootstrapServers { get; }

    public KafkaMockCluster(int brokers = 1)
    {
        if (brokers < 1) throw new ArgumentOutOfRangeException(nameof(brokers));
        Native.EnsureBound();
        var conf = rd_kafka_conf_new();
        var error = new StringBuilder(512);
        // A client handle owns the cluster; it never produces anything itself.
        // log_level 4: without bootstrap.servers (it needs none) the handle would print a notice.
        foreach (var (key, value) in new[] { ("client.id", "mamo-mock-cluster"), ("log_level", "4") })
            if (rd_kafka_conf_set(conf, key, value, error, (UIntPtr)error.Capacity) != 0)
                throw new InvalidOperationException($"librdkafka configuration {key}: {error}");
        handle = rd_kafka_new(0 /* RD_KAFKA_PRODUCER */, conf, error, (UIntPtr)error.Capacity);
        if (handle == IntPtr.Zero) throw new InvalidOperationException($"librdkafka could not start a client: {error}");
        cluster = rd_kafka_mock_cluster_new(handle, brokers);
        if (cluster == IntPtr.Zero) throw new InvalidOperationException("librdkafka could not start its mock cluster");
        BootstrapServers = Marshal.PtrToStringUTF8(rd_kafka_mock_cluster_bootstraps(cluster))!;
        // Consumers join a group at once instead of after the default 3 s.
        rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0);
    }

    public void CreateTopic(string topic, int partitions = 1)
    {
        var err = rd_kafka_mock_topic_create(cluster, topic, partitions, 1);
        if (err != 0) throw new InvalidOperationException($"mock cluster: cannot create topic {topic} ({err})");
    }

    /// <summary>Takes broker 1..N down (connections drop, new ones are refused) or brings it back.</summary>
    public void SetBrokerDown(int brokerId, bool down)
    {
        var err = down ? rd_kafka_mock_broker_set_down(cluster, brokerId) : rd_kafka_mock_broker_set_up(cluster, brokerId);
        if (err != 0) throw new InvalidOperationException($"mock cluster: broker {brokerId} ({err})");
    }

    /// <summary>How long a member of a KIP-848 consumer group may go silent before the group moves its partitions
    /// (the broker's group.consumer.session.timeout.ms; about 30 s in the mock by default).</summary>
    public void SetConsumerSessionTimeout(TimeSpan timeout) => rd_kafka_mock_set_group_consumer_session_timeout_ms(cluster, (int)timeout.TotalMilliseconds);

    public void Dispose()
    {
        if (cluster != IntPtr.Zero) rd_kafka_mock_cluster_destroy(cluster);
        if (handle != IntPtr.Zero) rd_kafka_destroy(handle);
        cluster = handle = IntPtr.Zero;
    }

    static class Native
    {
        static readonly Lazy<IntPtr> Loaded = new(Load);

        public static void EnsureBound() => _ = Loaded.Value;

        static IntPtr Load()
        {
            _ = Confluent.Kafka.Library.Version;   // makes Confluent.Kafka load its librdkafka
            var path = File.ReadLines("/proc/self/maps")
                .Select(line => line.Split(' ', StringSplitOptions.RemoveEmptyEntries))
                .Where(f => f.Length >= 6 && Path.GetFileName(f[5]).Contains("librdkafka"))
                .Select(f => f[5]).FirstOrDefault()
                ?? throw new InvalidOperationException("librdkafka is not loaded; Confluent.Kafka could not find its native library");
            var lib = NativeLibrary.Load(path);
            NativeLibrary.SetDllImportResolver(typeof(KafkaMockCluster).Assembly, Resolve);
            return lib;
        }

        static IntPtr Resolve(string name, Assembly assembly, DllImportSearchPath? path) => name == Library ? Loaded.Value : IntPtr.Zero;
    }

    [DllImport(Library)] static extern IntPtr rd_kafka_conf_new();
    [DllImport(Library)] static extern int rd_kafka_conf_set(IntPtr conf, [MarshalAs(UnmanagedType.LPUTF8Str)] string name, [MarshalAs(UnmanagedType.LPUTF8Str)] string value, StringBuilder errstr, UIntPtr size);
    [DllImport(Library)] static extern IntPtr rd_kafka_new(int type, IntPtr conf, StringBuilder errstr, UIntPtr size);
    [DllImport(Library)] static extern void rd_kafka_destroy(IntPtr rk);
    [DllImport(Library)] static extern IntPtr rd_kafka_mock_cluster_new(IntPtr rk, int brokers);
    [DllImport(Library)] static extern void rd_kafka_mock_cluster_destroy(IntPtr mc);
    [DllImport(Library)] static extern IntPtr rd_kafka_mock_cluster_bootstraps(IntPtr mc);
    [DllImport(Library)] static extern int rd_kafka_mock_topic_create(IntPtr mc, [MarshalAs(UnmanagedType.LPUTF8Str)] string topic, int partitions, int replicationFactor);
    [DllImport(Library)] static extern void rd_kafka_mock_group_initial_rebalance_delay_ms(IntPtr mc, int delayMs);
    [DllImport(Library)] static extern int rd_kafka_mock_broker_set_down(IntPtr mc, int brokerId);
    [DllImport(Library)] static extern void rd_kafka_mock_set_group_consumer_session_timeout_ms(IntPtr mc, int timeoutMs);
    [DllImport(Library)] static extern int rd_kafka_mock_broker_set_up(IntPtr mc, int brokerId);
}
