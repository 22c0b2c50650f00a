using System.Diagnostics;
using Mamo.Data.Datasets;
using Xunit;

namespace Mamo.Cli.Tests;

/// <summary>The Kubernetes manifests against the API's schemas (deploy/kubernetes/check.mjs, with kubernetes-models
/// fetched through npm into the data cache): no API server is at hand here, the schemas are.</summary>
public class DeployTests
{
    static readonly NpmPackage[] Checker = [new("kubernetes-models", "5.1.0"), new("js-yaml", "4.3.2")];

    static (int Code, string Output) Check(string manifest)
    {
        var prefix = Path.Combine(DataCache.Root(), "npm-kubernetes");
        new NpmClient().Install(prefix, Checker);
        var root = BuildTests.Root();
        // node resolves the packages from the script's folder: the check runs beside them.
        File.Copy(Path.Combine(root, "deploy", "kubernetes", "check.mjs"), Path.Combine(prefix, "check.mjs"), overwrite: true);
        var info = new ProcessStartInfo("node") { RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (var a in new[] { Path.Combine(prefix, "check.mjs"), manifest }) info.ArgumentList.Add(a);
        using var p = Process.Start(info)!;
        var stderr = p.StandardError.ReadToEndAsync();
        var stdout = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        return (p.ExitCode, stdout + stderr.Result);
    }

    [Fact]
    public void The_kubernetes_manifests_pass_the_schema_check_and_probe_what_the_dashboard_serves()
    {
        var manifest = Path.Combine(BuildTests.Root(), "deploy", "kubernetes", "mamo-cluster.yaml");
        var (code, output) = Check(manifest);
        Assert.True(code == 0, output);
        foreach (var kind in new[] { "Service/mamo", "PersistentVolumeClaim/mamo-runs", "PodDisruptionBudget/mamo", "StatefulSet/mamo" })
            Assert.Contains($"valid {manifest}: {kind}", output);
        var text = File.ReadAllText(manifest);
        Assert.Contains("path: /healthz, port: dashboard", text);
        Assert.Contains("path: /readyz, port: dashboard", text);
        Assert.Contains("secretKeyRef: { name: mamo-dashboard, key: token }", text);
        Assert.Contains("secret: { secretName: mamo-tls", text);

        // The check can fail: a count that is not a number.
        using var folder = new TempFolder();
        var broken = folder.File("broken.yaml");
        File.WriteAllText(broken, text.Replace("replicas: 3", "replicas: three"));
        (code, output) = Check(broken);
        Assert.Equal(1, code);
        Assert.Contains($"INVALID {broken}: StatefulSet/mamo: data/spec/replicas must be integer", output);
    }
}
